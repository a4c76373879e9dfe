"""Compile one fused-kernel configuration for sm_90 on a machine without a GPU (Triton's bundled
ptxas and cuobjdump) and count the SASS instructions that matter: no device time needed to see
whether the matrix instructions are wgmma or mma.sync, whether the activation loads are
asynchronous, how many decode instructions the loop holds, and its registers per thread (occupancy).

    python bench/sass_offline.py SCHEME BLOCK_N BLOCK_M SWAP_AB NUM_WARPS NUM_STAGES [MERGE_PLANES]
"""
import collections
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.bench.common import random_qweight
from lowbit.kernels.dispatch import kernel_constants, x_sums
from lowbit.kernels.triton_matmul import lowbit_matmul_kernel

if len(sys.argv) not in (7, 8) or not all(a.isdigit() for a in sys.argv[2:]):
    sys.exit(__doc__)
scheme, block_n, block_m, swap, warps, stages = sys.argv[1], *map(int, sys.argv[2:7])
merge = len(sys.argv) > 7 and bool(int(sys.argv[7]))
qw = random_qweight(scheme, 256, 1024, torch.float16, "cpu")
consts = {**kernel_constants(qw, torch.float16, torch.device("cuda")),
          "HAS_BIAS": False, "EVEN_K": True, "SPARSE": qw.scheme.sparsity is not None, "BLOCK_N": block_n,
          "HAS_X_SUMS": x_sums(torch.zeros(1, 1024, dtype=torch.float16), qw, 128) is not None,
          "BLOCK_M": block_m, "SWAP_AB": bool(swap), "MERGE_PLANES": merge}
names = lowbit_matmul_kernel.arg_names
TYPES = {torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.float16: "*fp16", torch.float32: "*fp32"}
segs = list(qw.packed) + [qw.packed[0]] * (3 - len(qw.packed))  # as dispatch passes them
pointer_types = {"x_ptr": "*fp16", "scales_ptr": TYPES[qw.scales.dtype], "bias_ptr": "*fp16", "out_ptr": "*fp16",
                 "xsums_ptr": "*fp32", "partial_ptr": "*fp32", "counter_ptr": "*i32", "zeros_ptr": "*u8" if qw.zeros is not None else
                 TYPES[qw.scales.dtype], **{f"seg{i}_ptr": TYPES[t.dtype] for i, t in enumerate(segs)}}
signature = {a: "constexpr" if a in consts else pointer_types.get(a, "i32") for a in names}
divisible = [a for a in names if a not in consts and a not in ("split_k", "k_tiles_per_split", "n_groups",
                                                                 "stride_xs")]
source = ASTSource(fn=lowbit_matmul_kernel, signature=signature,
                   constexprs={(names.index(k),): v for k, v in consts.items()},
                   attrs={(names.index(a),): [["tt.divisibility", 16]] for a in divisible})
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
cubin = Path("/tmp/lowbit_kernel.cubin")
cubin.write_bytes(kernel.asm["cubin"])
cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
registers = " ".join(re.findall(r"(REG:\d+|STACK:\d+)", usage))  # registers per thread, spill stack bytes
ops = collections.Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)",
                                                              sass, re.M))
print(f"{scheme} block_n={block_n} block_m={block_m} swap={bool(swap)} warps={warps} stages={stages} merge={merge}: "
      f"{sum(ops.values())} instructions, shared {kernel.metadata.shared} B, {registers}")
print(" ".join(f"{op}:{n}" for op, n in ops.most_common(30)))
print("waits after each wgmma:", sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0"))
