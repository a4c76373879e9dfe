"""Timing-only A/B: int4/int8 decoders without their packed subtraction (values off by a constant:
results wrong, only the time counts), same configs, same process."""
import torch
from lowbit.bench.common import graph_time_us, random_qweight, rotated_copies
from lowbit.kernels import decoders, dispatch
from lowbit.kernels.dispatch import KernelConfig

orig4, orig8 = decoders.int4_words_asm, decoders.int8_fp16_asm

def nosub4(fp16, zero):
    asm = orig4(fp16, zero)
    return "\n".join(l for l in asm.split("\n") if not (l.startswith("sub.") or l.startswith("fma.")))

def nosub8(zero):
    asm = orig8(zero)
    return asm.replace("sub.f16x2 $0, a, c;", "mov.b32 $0, a;").replace("sub.f16x2 $1, b, c;", "mov.b32 $1, b;")

def patch(on):
    dispatch.int4_words_asm = nosub4 if on else orig4
    dispatch.int8_fp16_asm = nosub8 if on else orig8
    dispatch._kernel_constants.cache_clear()

CASES = [  # scheme, K, N, M, dtype, block_n, warps, split
    ("int4-g128", 8192, 57344, 1, "float16", 128, 4, 2), ("int4-g128", 8192, 57344, 16, "float16", 128, 4, 1),
    ("int4-g128", 28672, 8192, 1, "float16", 128, 4, 8), ("int4-g128", 8192, 10240, 1, "float16", 128, 4, 6),
    ("int4-g128", 8192, 57344, 1, "bfloat16", 128, 4, 2), ("int4-g128", 8192, 57344, 32, "float16", 128, 4, 2),
    ("int8-channel", 8192, 57344, 1, "float16", 128, 2, 6), ("int8-channel", 28672, 8192, 1, "float16", 64, 2, 4),
]
dev = torch.device("cuda")
for scheme, k, n, m, dt, bn, warps, split in CASES:
    dtype = getattr(torch, dt)
    qw = random_qweight(scheme, n, k, dtype, dev)
    qws = rotated_copies(qw)
    x = torch.randn(m, k, dtype=dtype, device=dev)
    cfg = KernelConfig(block_n=bn, block_m=16 if m <= 16 else 32, split_k=split, swap_ab=True, num_warps=warps,
                       num_stages=3, merge_planes=scheme.startswith("int4"))
    t = {}
    for rep in range(3):
        for on in (False, True):
            patch(on)
            t.setdefault(on, []).append(graph_time_us([lambda q=q: dispatch.fused_matmul(x, q, None, cfg) for q in qws], 20))
    patch(False)
    a, b = min(t[False]), min(t[True])
    print(f"{scheme} {dt} {k}x{n} M={m}: with sub {a:.1f} us, without {b:.1f} us ({100 * (a / b - 1):+.1f} %) "
          f"{[round(v, 1) for v in t[False]]} {[round(v, 1) for v in t[True]]}", flush=True)
    del qws, qw
    torch.cuda.empty_cache()
