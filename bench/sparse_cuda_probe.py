"""Probe of the 2:4 CUDA kernel (lowbit/kernels/sparse24_mma.cu) on the 70B layer set.

1. Correctness against the exact reference (fp16 and bf16, group and per-channel scales); stops if wrong.
2. Per layer and batch: cuBLAS fp16, dense int4-g128, the Triton 2:4 kernel and the CUDA kernel at
   its heuristic and at neighbouring configs (split-K x0.5 / x2, other row blocks a warp), each
   CUDA-graph replayed over rotated weight copies. JSON to --json.

    PYTHONPATH=. python bench/sparse_cuda_probe.py --json out/probe.json
"""

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F

from lowbit.bench.common import LAYER_SETS, copies_for, graph_time_us, random_qweight, rotated_copies, run_metadata
from lowbit.kernels import dispatch, sparse_cuda
from lowbit.kernels.sparse_cuda import SparseConfig


def check(label: str) -> list[str]:
    bad = []
    for scheme in ("int4-g128-2:4", "int4-channel-2:4"):
        for dtype in (torch.float16, torch.bfloat16):
            qw = random_qweight(scheme, 1000, 2216, dtype, "cuda")
            ref_w = qw.dequantize(torch.float32)
            for m in (1, 8, 13, 64, 128):
                x = torch.randn(m, 2216, dtype=dtype, device="cuda")
                y = sparse_cuda.matmul(x, qw, None)
                ref = x.float() @ ref_w.T
                err = float((y.float() - ref).norm() / ref.norm())
                if not err < 1e-2:
                    bad.append(f"{scheme} {dtype} M={m}: {err:.3g}")
    print(f"[{label}] {'correct' if not bad else 'WRONG: ' + '; '.join(bad[:4])}", flush=True)
    return bad


def neighbours(cfg: SparseConfig) -> list[SparseConfig]:
    """The heuristic, split-K x0.5 / x2, and the other instantiated row blocks a warp."""
    out = [cfg, dataclasses.replace(cfg, split_k=max(1, cfg.split_k // 2)), dataclasses.replace(cfg, split_k=cfg.split_k * 2)]
    out += [dataclasses.replace(cfg, row_blocks=r, split_k=max(1, cfg.split_k * cfg.row_blocks // r)) for r in (1, 2, 4)
            if (cfg.token_blocks, r) in sparse_cuda.INSTANCES]
    return list(dict.fromkeys(out))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--batches", default="1,8,16,32,64")
    a = p.parse_args()
    result = {"meta": run_metadata("cuda"), "rows": []}
    result["wrong"] = check("heuristic configs")
    if result["wrong"]:
        json.dump(result, open(a.json, "w"), indent=1)
        return
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, k, n in LAYER_SETS["llama2-70b"]:
        dense = rotated_copies(random_qweight("int4-g128", n, k, torch.float16, "cuda"))
        sparse = rotated_copies(random_qweight("int4-g128-2:4", n, k, torch.float16, "cuda"))
        w0 = torch.randn(n, k, dtype=torch.float16, device="cuda")
        ws = [w0] + [w0.clone() for _ in range(copies_for(w0.numel() * 2, "cuda") - 1)]
        for m in map(int, a.batches.split(",")):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            row = {"layer": name, "m": m, "n": n, "k": k}
            row["cublas_us"] = graph_time_us([lambda w=w: F.linear(x, w) for w in ws])
            row["int4_dense_us"] = graph_time_us([lambda q=q: dispatch.matmul(x, q, None) for q in dense])
            tcfg = dispatch.choose_config(m, sparse[0], x.device, x.dtype)
            row["triton_24_us"] = graph_time_us([lambda q=q: dispatch.matmul(x, q, None, config=tcfg) for q in sparse])
            heur = sparse_cuda.heuristic_config(m, n, k, sms)
            row["cuda_24"] = []
            for cfg in neighbours(heur):
                us = graph_time_us([lambda q=q: sparse_cuda.matmul(x, q, None, cfg) for q in sparse])
                row["cuda_24"].append({**dataclasses.asdict(cfg), "us": us})
            best = min(row["cuda_24"], key=lambda r: r["us"])
            print(f"{name:8s} M={m:4d} cuBLAS {row['cublas_us']:7.1f}  int4 {row['int4_dense_us']:7.1f}  "
                  f"triton2:4 {row['triton_24_us']:7.1f}  cuda2:4 heur {row['cuda_24'][0]['us']:7.1f} best {best['us']:7.1f} "
                  f"({best['token_blocks']},{best['row_blocks']},{best['split_k']})", flush=True)
            result["rows"].append(row)
        del dense, sparse, ws, w0
        torch.cuda.empty_cache()
    json.dump(result, open(a.json, "w"), indent=1)
    blocks = {}
    for r in result["rows"]:
        b = blocks.setdefault(r["m"], {"cublas": 0, "dense": 0, "triton": 0, "cuda": 0})
        b["cublas"] += r["cublas_us"]
        b["dense"] += r["int4_dense_us"]
        b["triton"] += r["triton_24_us"]
        b["cuda"] += min(c["us"] for c in r["cuda_24"])
    print("block speedup over cuBLAS fp16:  M | int4 dense | triton 2:4 | cuda 2:4 (best probed)")
    for m, b in blocks.items():
        print(f"  {m:4d} | {b['cublas'] / b['dense']:.2f} | {b['cublas'] / b['triton']:.2f} | {b['cublas'] / b['cuda']:.2f}")


if __name__ == "__main__":
    main()
