"""``lowbit bench layers``: linear layers, lowbit vs cuBLAS (and peers), one run, CUDA-graph replay.

For each layer set (one transformer block's linears), scheme, activation dtype and batch M:
cuBLAS fp16/bf16 on the same shapes is the baseline; every timed call reads a different copy of
the weights (copies rotated over > 3x L2), captured in a CUDA graph, median of >= 20 replays.
Prints per-block speedups, the achieved fraction of the measured copy bandwidth, writes JSON
(and a PNG of speedup vs batch per scheme).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from triton.errors import TritonError

from ..kernels import dispatch
from ..scheme import Scheme
from .common import LAYER_SETS, copies_for, copy_bandwidth_gbs, graph_time_us, plot_speedups, random_qweight, \
    read_bandwidth_gbs, relative_error, replot, rotated_copies, run_metadata

DEFAULT_BATCHES = [1, 8, 16, 32, 64, 128, 256, 512, 1024]
DEFAULT_SCHEMES = ["int4-g128", "int8-channel"]


def _cublas_us(k: int, n: int, m: int, dtype, device, replays: int) -> float:
    w0 = torch.randn(n, k, dtype=dtype, device=device)
    ws = [w0] + [w0.clone() for _ in range(copies_for(w0.numel() * w0.element_size(), device) - 1)]
    x = torch.randn(m, k, dtype=dtype, device=device)
    us = graph_time_us([lambda w=w: F.linear(x, w) for w in ws], replays)
    del ws, w0
    return us


def _lowbit_us(qw, m: int, device, replays: int, config=None) -> float:
    qws = rotated_copies(qw)
    x = torch.randn(m, qw.in_features, dtype=qw.dtype, device=device)
    us = graph_time_us([lambda q=q: dispatch.matmul(x, q, None, config=config) for q in qws], replays)
    del qws
    return us


def _check(qw, device) -> float:
    """Relative error of the dispatched kernel vs the exact reference at M=16 (guards the numbers)."""
    x = torch.randn(16, qw.in_features, dtype=qw.dtype, device=device)
    return relative_error(dispatch.matmul(x, qw, None), x.float() @ qw.dequantize(torch.float32).T)


def _torch_int4_us(k: int, n: int, m: int, device, replays: int) -> float | None:
    """torch's built-in tinygemm int4 kernel (bf16, group 128), where this torch build has it."""
    try:
        w = torch.randint(0, 16, (n, k // 2), dtype=torch.uint8, device=device)
        packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        sz = torch.rand(k // 128, n, 2, dtype=torch.bfloat16, device=device)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        copies = [packed] + [packed.clone() for _ in range(copies_for(packed.numel() * packed.element_size(),
                                                                       device) - 1)]
        return graph_time_us([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p, 128, sz) for p in copies], replays)
    except (RuntimeError, AttributeError, TypeError) as e:  # absent or different API in this build
        print(f"  (torch int4 tinygemm unavailable: {str(e).splitlines()[0][:100]})")
        return None


def run(layer_sets, schemes, batches, dtypes, replays=25, peers=True, device="cuda", progress=tqdm.write) -> dict:
    device = torch.device(device)
    meta = run_metadata(device)
    bw, read_bw = copy_bandwidth_gbs(device), read_bandwidth_gbs(device)
    rows, blocks, errors = [], [], []
    # a step: one layer set's baselines (cuBLAS, peers) or one scheme, in one dtype
    bar = tqdm(total=len(layer_sets) * len(dtypes) * (1 + len(schemes)), desc="bench layers", unit="step")
    for set_name in layer_sets:
        layers = LAYER_SETS[set_name]
        for dtype in dtypes:
            dname = str(dtype).removeprefix("torch.")
            bar.set_postfix_str(f"{set_name} {dname} cuBLAS")
            base = {(name, m): _cublas_us(k, n, m, dtype, device, replays) for name, k, n in layers for m in batches}
            peer_rows = {}
            if peers and dtype == torch.bfloat16:
                for name, k, n in layers:
                    for m in batches:
                        peer_rows[(name, m)] = _torch_int4_us(k, n, m, device, replays)
                        if peer_rows[(name, m)] is None:
                            break
            bar.update()
            for scheme in schemes + (["torch-int4-tinygemm-g128"] if peer_rows else []):
                bar.set_postfix_str(f"{set_name} {dname} {scheme}")
                try:
                    per_m = _bench_scheme(scheme, set_name, layers, batches, base, peer_rows, dname, dtype, device,
                                          replays, rows)
                except (RuntimeError, ValueError, TritonError) as e:  # one scheme's failure keeps the other rows
                    progress(f"{set_name} {dname} {scheme}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    errors.append({"layer_set": set_name, "scheme": scheme, "dtype": dname, "error": str(e)[:2000]})
                    bar.update(scheme in schemes)
                    continue
                for m, (us, b, wb) in per_m.items():
                    if us:
                        blocks.append({"layer_set": set_name, "scheme": scheme, "dtype": dname, "M": m, "us": us,
                                       "baseline_us": b, "speedup": b / us, "roofline_frac": wb / us / 1e3 / bw,
                                       "read_roofline_frac": wb / us / 1e3 / read_bw})
                progress(f"{set_name} {dname} {scheme}: " + " ".join(
                    f"M{m}={per_m[m][1] / per_m[m][0]:.2f}x" for m in batches if per_m[m][0]))
                bar.update(scheme in schemes)  # the peer's row was timed with the baselines
            torch.cuda.empty_cache()
    bar.close()
    return {**meta, "kind": "layers", "copy_bandwidth_gbs": bw, "read_bandwidth_gbs": read_bw, "rows": rows,
            "blocks": blocks, "errors": errors}


def _bench_scheme(scheme, set_name, layers, batches, base, peer_rows, dname, dtype, device, replays, rows) -> dict:
    """Time one scheme on every layer and batch; append per-layer rows; return per-batch block sums."""
    per_m = {m: [0.0, 0.0, 0] for m in batches}
    for name, k, n in layers:
        if scheme.startswith("torch-"):
            qw, err, wbytes = None, None, n * k // 2 + (k // 128) * n * 4
        else:
            qw = random_qweight(scheme, n, k, dtype, device)
            err, wbytes = _check(qw, device), qw.nbytes
        for m in batches:
            us = peer_rows.get((name, m)) if qw is None else _lowbit_us(qw, m, device, replays)
            if us is None:
                continue
            b = base[(name, m)]
            cfg = None if qw is None else dispatch.choose_config(m, qw, device, dtype)
            rows.append({"layer_set": set_name, "layer": name, "scheme": scheme, "dtype": dname,
                         "K": k, "N": n, "M": m, "us": us, "baseline_us": b, "speedup": b / us,
                         "weight_bytes": wbytes, "gbs": (wbytes + 2 * m * (k + n)) / us / 1e3,
                         "rel_err": err, "config": None if cfg is None else cfg.__dict__})
            per_m[m][0] += us
            per_m[m][1] += b
            per_m[m][2] += wbytes
        del qw
    return per_m


def format_table(result: dict) -> str:
    # roof@1: weight bytes over time at M=1 against the read bandwidth (runs before it was measured:
    # against the copy bandwidth, which counts read and written bytes)
    read = "read_bandwidth_gbs" in result
    lines = [f"{result['gpu']}  copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s  " +
             (f"read bandwidth {result['read_bandwidth_gbs']:.0f} GB/s  " if read else "") + f"commit {result['commit']}"]
    blocks = result["blocks"]
    batches = sorted({b["M"] for b in blocks})
    for set_name in dict.fromkeys(b["layer_set"] for b in blocks):
        for dname in dict.fromkeys(b["dtype"] for b in blocks if b["layer_set"] == set_name):
            sel = [b for b in blocks if b["layer_set"] == set_name and b["dtype"] == dname]
            base = {b["M"]: b["baseline_us"] for b in sel}
            lines.append(f"\n{set_name} block, {dname}: speedup over cuBLAS {dname} (block us at M=1: "
                         f"{base.get(1, float('nan')):.0f})")
            lines.append(f"{'scheme':26s}" + "".join(f"{'M=' + str(m):>8s}" for m in batches) + f"{'roof@1':>8s}")
            for scheme in dict.fromkeys(b["scheme"] for b in sel):
                by_m = {b["M"]: b for b in sel if b["scheme"] == scheme}
                roof = by_m[1]["read_roofline_frac" if read else "roofline_frac"] if 1 in by_m else float("nan")
                lines.append(f"{scheme:26s}" + "".join(
                    f"{by_m[m]['speedup']:8.2f}" if m in by_m else f"{'-':>8s}" for m in batches) + f"{roof:8.0%}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    panels = {}
    for b in result["blocks"]:
        curves = panels.setdefault(f"{b['layer_set']} block, {b['dtype']}, {result['gpu']}", {})  # a panel per dtype
        curves.setdefault(b["scheme"], []).append((b["M"], b["speedup"]))
    plot_speedups(path, panels, "batch M (tokens)", "speedup over cuBLAS (same dtype)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit bench layers", description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(LAYER_SETS), choices=list(LAYER_SETS))
    p.add_argument("--shape", action="append", default=[], metavar="KxN",
                   help="extra layer K x N (in x out), e.g. 4096x11008; replaces --sets when given")
    p.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES)
    p.add_argument("--batches", nargs="+", type=int, default=DEFAULT_BATCHES)
    p.add_argument("--dtypes", nargs="+", default=["float16"], choices=["float16", "bfloat16"])
    p.add_argument("--replays", type=int, default=25)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="no measurement: print the table of an earlier run's JSON (and draw --plot), e.g. on a machine "
                        "without a GPU")
    a = p.parse_args(argv)
    if a.replot:
        return replot(p, a.replot, "layers", a.plot, plot, format_table)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    for s in a.schemes:
        Scheme.parse(s)
    sets = a.sets
    if a.shape:
        custom = []
        for i, s in enumerate(a.shape):
            k, _, n = s.lower().partition("x")
            if not (k.isdigit() and n.isdigit()):
                p.error(f"--shape must be KxN, got {s!r}")
            custom.append((f"shape{i}", int(k), int(n)))
        LAYER_SETS["custom"] = custom
        sets = ["custom"]
    result = run(sets, a.schemes, a.batches, [getattr(torch, d) for d in a.dtypes], a.replays, not a.no_peers)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    if a.plot:
        plot(result, a.plot)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
