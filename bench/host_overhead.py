"""Host (Python) time of one eager matmul call, layer by layer down the call stack, on a GPU: what an
eager prefill pays per linear layer besides the kernels (session 6: int4's 7B prefill at batch 1 took
55.7 ms against fp16's 21.8 ms, with 9.3 ms of kernels).

    python bench/host_overhead.py [SCHEME] [M]

Each line is the mean wall time of many calls issued back to back with one synchronize at the end,
on a weight small enough (1024 x 1024) that the GPU finishes each kernel before the host issues the
next. Then what an eager decode step pays: a loop over 128 distinct layers of LLaMA-2-7B's shapes
(32 x qkv, o, gate_up, down) at M tokens, per linear, for QuantLinear; for nn.Linear the same loop
over 4 layers repeated 32 times (fp16 weights of 128 layers would not add to what it shows: that loop
is bound by its GPU time, not the host's); then the profile of the QuantLinear loop by own time.
"""
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit.bench.common import LAYER_SETS, random_qweight
from lowbit.kernels import dispatch


def per_call_us(fn, calls: int = 2000) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    if len(sys.argv) > 3 or (len(sys.argv) == 3 and not sys.argv[2].isdigit()):
        sys.exit(__doc__)
    scheme = sys.argv[1] if len(sys.argv) > 1 else "int4-g128"
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    dev = torch.device("cuda")
    w = torch.randn(1024, 1024, dtype=torch.float16, device=dev)
    qw = lowbit.quantize(w, scheme)
    layer = lowbit.QuantLinear.from_qweight(qw).to(dev)
    x = torch.randn(m, 1024, dtype=torch.float16, device=dev)
    cfg = dispatch.choose_config(m, qw, dev, x.dtype)
    rows = [("F.linear fp16 (cuBLAS)", lambda: F.linear(x, w)),
            ("QuantLinear.forward", lambda: layer(x)),
            ("lowbit.matmul (checks, then the op's implementation)", lambda: lowbit.matmul(x, qw)),
            ("torch.ops.lowbit.matmul (the custom op's dispatch)", lambda: torch.ops.lowbit.matmul(
                x, list(qw.packed), qw.scales, qw.zeros, qw.perm, None, str(qw.scheme), qw.out_features,
                qw.in_features, "float16", "auto")),
            ("dispatch.matmul (no op)", lambda: dispatch.matmul(x, qw, None))]
    if cfg.path == "fused":
        rows.append((f"dispatch.fused_matmul ({cfg.block_n}x{cfg.block_m}, split {cfg.split_k})",
                     lambda: dispatch.fused_matmul(x, qw, None, cfg)))
    print(f"{scheme} M={m} on {torch.cuda.get_device_name(dev)}, config {cfg}")
    shapes = [(k, n) for _, k, n in LAYER_SETS["llama2-7b"]] * 32
    quantized = [lowbit.QuantLinear.from_qweight(random_qweight(scheme, n, k, torch.float16, dev)) for k, n in shapes]
    dense = [torch.nn.Linear(k, n, bias=False, dtype=torch.float16, device=dev) for k, n in shapes[:4]] * 32
    inputs = {k: torch.randn(m, k, dtype=torch.float16, device=dev) for k in {k for k, _ in shapes}}

    def decode_loop(layers):
        return lambda: [layer(inputs[layer.in_features]) for layer in layers]

    with torch.inference_mode():
        for name, fn in rows:
            print(f"  {per_call_us(fn):7.1f} us  {name}")
        for name, layers in (("QuantLinear", quantized), ("nn.Linear fp16 (GPU-bound)", dense)):
            print(f"  {per_call_us(decode_loop(layers), 20) / len(layers):7.1f} us  {name}, a linear of a loop over "
                  f"128 LLaMA-2-7B layers")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(10):
            decode_loop(quantized)()
        torch.cuda.synchronize()
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(24)


if __name__ == "__main__":
    main()
