"""Probe: does the memory order of the packed words decide the fused kernel's speed?

Times the fused kernel on the same random weights stored with row blocks of 1 (layout v2: each
row's tiles contiguous, so one k-tile of a 64-row program is 64 chunks of 64 B, 4 KB apart) and of
16 or 64 rows (each row block's k-tile one contiguous chunk), over a few configs near the tuned
one, against cuBLAS fp16 of the same shapes. Checks first that every layout gives the same output.

    python bench/probe_layout.py --schemes int4-g128 --ms 1 16 --rbs 1 16 64
"""
import argparse
import dataclasses
import json
import os
import types

import torch
import torch.nn.functional as F

from lowbit import pack
from lowbit.bench.common import LAYER_SETS, copies_for, graph_time_us, random_qweight
from lowbit.kernels import dispatch


def row_blocked(seg: torch.Tensor, rb: int, d: int) -> torch.Tensor:
    """``[N, tiles * D]`` (v2) -> ``[ceil(N / rb), tiles * rb * D]``: row blocks, tile-major inside."""
    n, words = seg.shape
    tiles = words // d
    nb = -(-n // rb)
    padded = torch.zeros(nb * rb, words, dtype=seg.dtype, device=seg.device)
    padded[:n] = seg
    return padded.view(nb, rb, tiles, d).permute(0, 2, 1, 3).reshape(nb, tiles * rb * d).contiguous()


def as_layout(qw, rb: int):
    d = pack.plane_depth(qw.scheme.bits)
    packed = tuple(row_blocked(s, rb, d) for s in qw.packed) if rb > 1 else qw.packed
    return types.SimpleNamespace(scheme=qw.scheme, shape=qw.shape, out_features=qw.out_features,
                                 in_features=qw.in_features, packed=packed, scales=qw.scales, zeros=qw.zeros,
                                 num_groups=qw.num_groups, perm=None, dtype=qw.dtype,
                                 nbytes=sum(t.numel() * t.element_size() for t in packed) + qw.scales.nbytes)


def clone(q):
    return types.SimpleNamespace(**{**vars(q), "packed": tuple(t.clone() for t in q.packed),
                                    "scales": q.scales.clone()})


def run_rb(rb: int, fn):
    pack.ROW_BLOCK = rb
    try:
        return fn()
    finally:
        pack.ROW_BLOCK = 1


def candidates(base: dispatch.KernelConfig):
    seen = [base]
    for kw in ({"num_stages": 4}, {"num_stages": 5}, {"block_n": 128}, {"block_n": 32},
               {"split_k": max(1, base.split_k * 2)}, {"split_k": max(1, base.split_k // 2)}):
        c = dataclasses.replace(base, **kw)
        if c not in seen:
            seen.append(c)
    return seen


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sets", nargs="+", default=["llama2-70b"])
    p.add_argument("--schemes", nargs="+", default=["int4-g128"])
    p.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    p.add_argument("--rbs", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--json")
    a = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for set_name in a.sets:
        for name, k, n in LAYER_SETS[set_name]:
            for m in a.ms:
                w = torch.randn(n, k, dtype=torch.float16, device=dev)
                x = torch.randn(m, k, dtype=torch.float16, device=dev)
                ws = [w] + [w.clone() for _ in range(copies_for(w.nbytes, dev) - 1)]
                base_us = graph_time_us([lambda w=w: F.linear(x, w) for w in ws], 20)
                del ws, w
                for scheme in a.schemes:
                    qw = random_qweight(scheme, n, k, torch.float16, dev)
                    tuned = dispatch.choose_config(m, qw, dev)
                    if tuned.path != "fused":
                        continue
                    ref = dispatch.fused_matmul(x, qw, None, tuned)
                    for rb in a.rbs:
                        q = as_layout(qw, rb)
                        out = run_rb(rb, lambda: dispatch.fused_matmul(x, q, None, tuned))
                        if not torch.equal(out, ref):
                            raise SystemExit(f"ROW_BLOCK={rb} output differs from v2 on {name} M={m}")
                        qs = [q] + [clone(q) for _ in range(copies_for(q.nbytes, dev) - 1)]
                        best = None
                        for cfg in candidates(tuned):
                            try:
                                us = run_rb(rb, lambda: graph_time_us(
                                    [lambda q=q: dispatch.fused_matmul(x, q, None, cfg) for q in qs], 20))
                            except Exception as e:  # noqa: BLE001 - a config the GPU cannot run
                                print("  skip", cfg, type(e).__name__)
                                continue
                            row = {"set": set_name, "layer": name, "K": k, "N": n, "M": m, "scheme": scheme, "rb": rb,
                                   "config": dataclasses.asdict(cfg), "us": us, "baseline_us": base_us,
                                   "gbs": q.nbytes / us / 1e3}
                            rows.append(row)
                            if best is None or us < best["us"]:
                                best = row
                        print(f"{scheme:18s} {name:8s} M={m:<3d} rb={rb:<3d} best {best['us']:7.1f} us "
                              f"{best['gbs']:6.0f} GB/s  x{base_us / best['us']:.2f}  (tuned-config us "
                              f"{[r['us'] for r in rows if r['rb'] == rb and r['layer'] == name and r['M'] == m and r['scheme'] == scheme][0]:.1f}) {best['config']}",
                              flush=True)
                        del qs, q
                    del qw
                    torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    # block sums: best per layer, per (scheme, M, rb)
    print("\nblock speedup (best config per layer):")
    for scheme in a.schemes:
        for m in a.ms:
            line = f"{scheme:18s} M={m:<3d}"
            for rb in a.rbs:
                sel = [r for r in rows if r["scheme"] == scheme and r["M"] == m and r["rb"] == rb]
                best = {}
                for r in sel:
                    if r["layer"] not in best or r["us"] < best[r["layer"]]["us"]:
                        best[r["layer"]] = r
                if best:
                    line += f"  rb{rb}: {sum(r['baseline_us'] for r in best.values()) / sum(r['us'] for r in best.values()):.2f}x"
            print(line)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
