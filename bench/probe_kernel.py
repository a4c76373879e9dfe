"""Compile one fused-kernel config on the GPU and report what the compiler made of it:
registers, spills, shared memory, and the matrix / load / decode instructions in its PTX."""
import re
import sys

import torch

from lowbit.bench.common import random_qweight
from lowbit.kernels import dispatch
from lowbit.kernels.dispatch import KernelConfig

scheme, m, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = KernelConfig(**eval(f"dict({sys.argv[5]})")) if len(sys.argv) > 5 else None
qw = random_qweight(scheme, n, k, torch.float16, "cuda")
x = torch.randn(m, k, dtype=torch.float16, device="cuda")
cfg = cfg or dispatch.choose_config(m, qw, x.device, x.dtype)
dispatch.fused_matmul(x, qw, None, cfg)
kernel = dispatch.lowbit_matmul_kernel
compiled = [c for dev in kernel.device_caches.values() for c in dev[0].values()][-1]
ptx = compiled.asm.get("ptx", "")
print(scheme, m, n, k, cfg)
print(f"regs {compiled.n_regs} spills {compiled.n_spills} shared {compiled.metadata.shared}")
for name, pat in [("wgmma", r"wgmma"), ("mma.sync", r"mma\.sync"), ("cp.async", r"cp\.async"),
                  ("ld.global.v4", r"ld\.global[^;]*\.v4"), ("tma", r"cp\.async\.bulk\.tensor"),
                  ("lop3", r"lop3"), ("prmt", r"prmt"), ("sub.f16x2", r"sub\.f16x2"), ("cvt", r"\bcvt\.")]:
    print(f"  ptx {name}: {len(re.findall(pat, ptx))}")
