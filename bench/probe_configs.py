"""Time a grid of fused-kernel configs on one scheme and shape (the benchmark's method: CUDA-graph
replay over weight copies > 3x L2), to see which knobs matter before a full `lowbit tune`.

    python bench/probe_configs.py int4-g128 8192x57344 --ms 1 16 --block-n 64 128 --warps 2 4 \
        --stages 3 4 --splits 1 2 4 --merge 0 1
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from lowbit.bench.common import copies_for, graph_time_us, random_qweight, rotated_copies
from lowbit.kernels import dispatch
from lowbit.kernels.dispatch import KernelConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scheme")
    p.add_argument("shape", help="KxN (in x out)")
    p.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    p.add_argument("--block-n", nargs="+", type=int, default=[64])
    p.add_argument("--warps", nargs="+", type=int, default=[2])
    p.add_argument("--stages", nargs="+", type=int, default=[3])
    p.add_argument("--splits", nargs="+", type=int, default=[1, 2])
    p.add_argument("--block-m", nargs="+", type=int, default=[0], help="token tiles (0: the batch's, at most 64)")
    p.add_argument("--swap", nargs="+", type=int, default=[1], help="1: weights as the wide operand, 0: not")
    p.add_argument("--merge", nargs="+", type=int, default=[0], choices=[0, 1],
                   help="1: one product per scale group (merge_planes)")
    p.add_argument("--maxnreg", nargs="+", type=int, default=[0], help="register caps (0: none)")
    p.add_argument("--dtype", default="float16")
    a = p.parse_args()
    for cap in a.maxnreg:
        if cap:
            try:
                KernelConfig(maxnreg=cap)
            except ValueError as e:
                p.error(str(e))
    k, n = map(int, a.shape.lower().split("x"))
    dtype = getattr(torch, a.dtype)
    dev = torch.device("cuda")
    qw = random_qweight(a.scheme, n, k, dtype, dev)
    qws = rotated_copies(qw)
    for m in a.ms:
        x = torch.randn(m, k, dtype=dtype, device=dev)
        w = torch.randn(n, k, dtype=dtype, device=dev)
        ws = [w] + [w.clone() for _ in range(copies_for(w.nbytes, dev) - 1)]
        base = graph_time_us([lambda w=w: F.linear(x, w) for w in ws], 15)
        del ws, w
        dequant = graph_time_us([lambda q=q: dispatch.matmul(x, q, None, config=KernelConfig(path="dequant"))
                                 for q in qws], 15)
        results = []
        for bn, bm, swap, warps, stages, split, merge, cap in itertools.product(
                a.block_n, a.block_m, a.swap, a.warps, a.stages, a.splits, a.merge, a.maxnreg):
            cfg = KernelConfig(block_n=bn, block_m=bm or max(16, min(64, 1 << (m - 1).bit_length())), split_k=split,
                               swap_ab=bool(swap), num_warps=warps, num_stages=stages, merge_planes=bool(merge),
                               maxnreg=cap or None)
            try:
                us = graph_time_us([lambda q=q: dispatch.fused_matmul(x, q, None, cfg) for q in qws], 15)
            except Exception as e:  # noqa: BLE001 - a config this GPU cannot run
                print(f"  {cfg}: {type(e).__name__}")
                continue
            results.append((us, cfg))
        results.sort(key=lambda r: r[0])
        print(f"{a.scheme} {a.shape} M={m}: cuBLAS {base:.1f} us, dequantize + cuBLAS {dequant:.1f} us "
              f"(x{base / dequant:.2f})")
        for us, cfg in results:
            print(f"  {us:7.1f} us  x{base / us:.2f}  {qw.nbytes / us / 1e3:5.0f} GB/s  bn={cfg.block_n} "
                  f"bm={cfg.block_m} swap={int(cfg.swap_ab)} warps={cfg.num_warps} stages={cfg.num_stages} "
                  f"split={cfg.split_k} merge={int(cfg.merge_planes)} maxnreg={cfg.maxnreg}", flush=True)


if __name__ == "__main__":
    main()
