"""Does an asynchronous wgmma with its weight operand in registers overlap the next tile's decode on
Hopper? A probe in Gluon (Triton's explicit-layout dialect, Triton >= 3.6), ahead of any port of the
fused kernel (see bench/NOTES.md, session 6, "Gluon").

Triton's ``tl.dot`` waits for every product whose A operand sits in registers (``pendings=0``), so the
fused kernel decodes and multiplies in turn. Here the A tile (uint8 codes standing in for packed
weights) is loaded straight in the wgmma A-operand layout, decoded in registers, and multiplied
with ``warpgroup_mma(..., is_async=True)``; ``warpgroup_mma_wait(WAIT_N)`` leaves WAIT_N products in
flight. The K loop is unrolled by two, so the product in flight and the tile being decoded use
different registers (a product must not have its A registers rewritten while it runs). The
activations come by TMA into a two-stage shared ring.

    python bench/gluon_wgmma_probe.py sass [WAIT_N [ring]]  # offline (no GPU): compile for sm_90a, count waits
    python bench/gluon_wgmma_probe.py gpu                   # on a Hopper GPU: check against torch, time WAIT_N
                                                            # 0 vs 1 at 16 and 64 tokens, light and int4-like
                                                            # decode, codes from registers and from a TMA ring

``ring`` (session 7, after the first GPU run): the codes also come by TMA into a 4-deep shared ring
and are read from shared memory in the operand layout, as a real kernel's weights would be. The
first probe (plain loads into registers) read its codes at a fifth of the bandwidth, too slow to
show what the overlap is worth at full speed.

Offline (session 6, Triton 3.6): WAIT_N=1 compiles to ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` in the loop,
with the next tile's loads and decode between the two products; a layout conversion of A through
shared memory instead makes ptxas serialize every wgmma (warning C7515).
"""
import itertools
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

BM, BK, BN, WARPS = 64, 64, 64, 4
STAGES = 4  # the ring probe's depth


@gluon.jit
def _decode(q_ptrs, i, BK: gl.constexpr, HEAVY: gl.constexpr):
    return _decode_codes(gl.load(q_ptrs + i * BK), HEAVY)  # codes loaded in the A-operand layout: no conversion


@gluon.jit
def _decode_codes(q, HEAVY: gl.constexpr):
    if HEAVY:  # the same value by exponent tricks on each nibble: int4-like work per element
        a = q.to(gl.int16)
        hi = ((a >> 4) | 0x6400).to(gl.float16, bitcast=True) - 1024.0
        lo = ((a & 15) | 0x6400).to(gl.float16, bitcast=True) - 1024.0
        return (hi * 16.0 + lo) * 0.0625 - 8.0
    return q.to(gl.float16) * 0.0625 - 8.0  # a stand-in for the plane decoders


@gluon.jit
def wgmma_probe_kernel(q_ptr, b_desc, c_ptr, K, stride_qm, stride_cm, BM: gl.constexpr, BK: gl.constexpr,
                       WAIT_N: gl.constexpr, HEAVY: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = b_desc.block_type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [2, BK, BN], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)
    rm = gl.program_id(0) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, a_op))
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, a_op))
    q_ptrs = q_ptr + gl.expand_dims(rm, 1) * stride_qm + gl.expand_dims(rk, 0)
    off_n = gl.program_id(1) * BN
    mbarrier.expect(bars.index(0), b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(b_desc, [0, off_n], bars.index(0), b_smem.index(0))
    acc = gl.zeros([BM, BN], gl.float32, layout=mma)
    a1 = gl.zeros([BM, BK], gl.float16, layout=a_op)
    phase = 0
    for j in range(K // (2 * BK)):
        i0 = 2 * j
        a0 = _decode(q_ptrs, i0, BK, HEAVY)  # under the product of a1 still in flight
        mbarrier.wait(bars.index(0), phase)
        acc = warpgroup_mma(a0, b_smem.index(0), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=WAIT_N, deps=(acc, a1))  # a1's product retired
        mbarrier.expect(bars.index(1), b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(b_desc, [(i0 + 1) * BK, off_n], bars.index(1), b_smem.index(1))
        a1 = _decode(q_ptrs, i0 + 1, BK, HEAVY)  # under a0's product
        mbarrier.wait(bars.index(1), phase)
        acc = warpgroup_mma(a1, b_smem.index(1), acc, is_async=True)
        acc, a0 = warpgroup_mma_wait(num_outstanding=WAIT_N, deps=(acc, a0))
        if i0 + 2 < K // BK:
            mbarrier.expect(bars.index(0), b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(b_desc, [(i0 + 2) * BK, off_n], bars.index(0), b_smem.index(0))
        phase ^= 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.invalidate(bars.index(0))
    mbarrier.invalidate(bars.index(1))
    store: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    out = gl.convert_layout(acc, store)
    rmc = gl.program_id(0) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, store))
    rnc = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, store))
    gl.store(c_ptr + gl.expand_dims(rmc, 1) * stride_cm + gl.expand_dims(rnc, 0), out)


@gluon.jit
def _issue(a_desc, b_desc, bars, a_smem, b_smem, t, off_m, off_n, STAGES: gl.constexpr):
    """TMA loads of k-tile ``t`` of the codes and the activations into ring slot ``t % STAGES``."""
    slot = t % STAGES
    BK: gl.constexpr = a_desc.block_type.shape[1]
    mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, t * BK], bars.index(slot), a_smem.index(slot))
    tma.async_copy_global_to_shared(b_desc, [t * BK, off_n], bars.index(slot), b_smem.index(slot))


@gluon.jit
def _ring_tile(a_smem, bars, t, a_op: gl.constexpr, HEAVY: gl.constexpr, STAGES: gl.constexpr):
    """Wait for k-tile ``t`` and decode its codes from shared memory into the A-operand layout."""
    mbarrier.wait(bars.index(t % STAGES), (t // STAGES) & 1)
    return _decode_codes(a_smem.index(t % STAGES).load(a_op), HEAVY)


@gluon.jit
def wgmma_ring_probe_kernel(a_desc, b_desc, c_ptr, K, stride_cm, WAIT_N: gl.constexpr, HEAVY: gl.constexpr,
                            STAGES: gl.constexpr, num_warps: gl.constexpr):
    """The probe with its codes streamed like a real kernel's weights: codes and activations by TMA
    into a STAGES-deep shared ring, codes read from shared memory in the operand layout, decoded, one
    product left in flight with WAIT_N=1. A slot is refilled once the product that read it retired."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BN, 16])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    off_m = gl.program_id(0) * BM
    off_n = gl.program_id(1) * BN
    BK: gl.constexpr = a_desc.block_type.shape[1]
    n_k = K // BK
    for t in gl.static_range(STAGES - 1):
        _issue(a_desc, b_desc, bars, a_smem, b_smem, t, off_m, off_n, STAGES)
    acc = gl.zeros([BM, BN], gl.float32, layout=mma)
    a1 = gl.zeros([BM, BK], gl.float16, layout=a_op)
    for i in range(0, n_k, 2):  # unrolled by two: the product in flight keeps its A registers
        a0 = _ring_tile(a_smem, bars, i, a_op, HEAVY, STAGES)
        acc = warpgroup_mma(a0, b_smem.index(i % STAGES), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=WAIT_N, deps=(acc, a1))  # product i-1 retired
        if i + STAGES - 1 < n_k:  # into product i-1's slot
            _issue(a_desc, b_desc, bars, a_smem, b_smem, i + STAGES - 1, off_m, off_n, STAGES)
        a1 = _ring_tile(a_smem, bars, i + 1, a_op, HEAVY, STAGES)
        acc = warpgroup_mma(a1, b_smem.index((i + 1) % STAGES), acc, is_async=True)
        acc, a0 = warpgroup_mma_wait(num_outstanding=WAIT_N, deps=(acc, a0))  # product i retired
        if i + STAGES < n_k:
            _issue(a_desc, b_desc, bars, a_smem, b_smem, i + STAGES, off_m, off_n, STAGES)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    store: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    out = gl.convert_layout(acc, store)
    rmc = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, store))
    rnc = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, store))
    gl.store(c_ptr + gl.expand_dims(rmc, 1) * stride_cm + gl.expand_dims(rnc, 0), out)


def sass(wait_n: int, ring: bool) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.language import NVMMASharedLayout, float16, uint8

    fn = wgmma_ring_probe_kernel if ring else wgmma_probe_kernel
    names = fn.arg_names
    b_layout = NVMMASharedLayout.get_default_for([BK, BN], float16)
    b_desc = f"tensordesc<fp16[{BK}, {BN}],{b_layout!r}>"
    if ring:
        a_layout = NVMMASharedLayout.get_default_for([BM, BK], uint8)
        consts = {"WAIT_N": wait_n, "HEAVY": 1, "STAGES": STAGES, "num_warps": WARPS}
        signature = {"a_desc": f"tensordesc<u8[{BM}, {BK}],{a_layout!r}>", "b_desc": b_desc, "c_ptr": "*fp32",
                     "K": "i32", "stride_cm": "i32"}
        aligned = ("c_ptr", "K", "stride_cm")
    else:
        consts = {"BM": BM, "BK": BK, "WAIT_N": wait_n, "HEAVY": 1, "num_warps": WARPS}
        signature = {"q_ptr": "*u8", "b_desc": b_desc, "c_ptr": "*fp32", "K": "i32", "stride_qm": "i32",
                     "stride_cm": "i32"}
        aligned = ("q_ptr", "c_ptr", "K", "stride_qm", "stride_cm")
    signature.update({k: "constexpr" for k in consts})
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = GluonASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                         attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS})
    cubin = Path("/tmp/gluon_wgmma_probe.cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    text = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", text)
    print(f"{'ring' if ring else 'registers'} WAIT_N={wait_n}: {text.count('HGMMA')} HGMMA, wgmma waits {waits}, "
          f"shared {kernel.metadata.shared} B, {text.count(' LDS')} LDS, {text.count(' STL')} STL (spills)")


def gpu() -> None:
    import torch
    from triton.experimental.gluon.language import NVMMASharedLayout, float16, uint8
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from lowbit.bench.common import graph_time_us

    m, k = 16384, 8192  # weights as the wide operand (128 MB of codes: > 2x L2)
    q = torch.randint(0, 256, (m, k), dtype=torch.uint8, device="cuda")
    q_desc = TensorDescriptor.from_tensor(q, [BM, BK], NVMMASharedLayout.get_default_for([BM, BK], uint8))
    for n in (16, 64):  # tokens
        b = torch.randn(k, n, dtype=torch.float16, device="cuda")
        desc = TensorDescriptor.from_tensor(b, [BK, n], NVMMASharedLayout.get_default_for([BK, n], float16))
        reference = (q.float() * 0.0625 - 8.0) @ b.float()
        for ring, heavy, wait_n in itertools.product((0, 1), (0, 1), (0, 1)):
            c = torch.full((m, n), float("nan"), device="cuda")

            def launch(c=c, wait_n=wait_n, heavy=heavy, desc=desc, ring=ring):
                if ring:
                    wgmma_ring_probe_kernel[(m // BM, 1)](q_desc, desc, c, k, c.stride(0), wait_n, heavy, STAGES,
                                                          num_warps=WARPS)
                else:
                    wgmma_probe_kernel[(m // BM, 1)](q, desc, c, k, q.stride(0), c.stride(0), BM, BK, wait_n, heavy,
                                                     num_warps=WARPS)

            launch()
            err = float((c - reference).norm() / reference.norm())
            us = graph_time_us([launch], 20)
            print(f"{'ring' if ring else 'registers'} tokens={n} heavy={heavy} WAIT_N={wait_n}: relative error "
                  f"{err:.1e}, {us:.1f} us, {q.numel() / us / 1e3:.0f} GB/s of codes")

if __name__ == "__main__":
    if (len(sys.argv) < 2 or sys.argv[1] not in ("sass", "gpu") or len(sys.argv) > 4
            or (len(sys.argv) > 2 and not sys.argv[2].isdigit()) or (len(sys.argv) > 3 and sys.argv[3] != "ring")):
        sys.exit(__doc__)
    if sys.argv[1] == "sass":
        sass(int(sys.argv[2]) if len(sys.argv) > 2 else 1, len(sys.argv) > 3)
    else:
        gpu()
