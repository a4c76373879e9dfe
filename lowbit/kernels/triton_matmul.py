"""Triton kernels: fused low-bit-weight matmul, and dequantization (for the prefill path).

Both read the ``tiled-planes-v1`` layout (see :mod:`lowbit.pack`): a weight tile of
``BLOCK_N`` rows x 128 input weights is one ``[BLOCK_N, 16]`` word tile per bit segment; one
shift-and-mask gives plane ``j`` (16 consecutive k), which is decoded to fp16/bf16 with a few
integer operations (exponent bit tricks, no int-to-float conversion) and fed to ``tl.dot``.

Orientation: with ``SWAP_AB`` the weight is the wide (M-side) operand of the matrix instruction,
``out.T[N, M] = W[N, K] @ x.T[K, M]``, so a batch of 1..64 tokens still fills 64-row wgmma tiles;
without it, ``out[M, N] = x @ W.T`` with large token tiles (prefill).

Split-K is reduced inside the kernel, deterministically: each split writes an fp32 partial,
bumps a per-tile counter, and the last split to arrive sums all partials in split order, writes
the output and resets the counter (so the counters stay zero between launches and under CUDA
graph replay).
"""

import triton
import triton.language as tl


@triton.jit
def _word_offsets(rn, t, rp, stride, PD: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Offsets of the ``[rows, PD]`` word tile of k-tile ``t``: row blocks of ``ROW_BLOCK`` rows,
    each block storing its tiles one after the other (a block's tile is one contiguous chunk)."""
    return (rn[:, None] // ROW_BLOCK) * stride + (rn[:, None] % ROW_BLOCK) * PD + t * (ROW_BLOCK * PD) + rp[None, :]


@triton.jit
def _extract_codes(w0, w1, w2, j: tl.constexpr, SEG0: tl.constexpr, SEG1: tl.constexpr, SEG2: tl.constexpr):
    """Codes of plane ``j`` from the word tiles of up to three segments (most significant first)."""
    code = (w0.to(tl.int32) >> (j * SEG0)) & ((1 << SEG0) - 1)
    if SEG1 > 0:
        code = (code << SEG1) | ((w1.to(tl.int32) >> (j * SEG1)) & ((1 << SEG1) - 1))
    if SEG2 > 0:
        code = (code << SEG2) | ((w2.to(tl.int32) >> (j * SEG2)) & ((1 << SEG2) - 1))
    return code


@triton.jit
def _decode(code, zero, COMPUTE: tl.constexpr, IS_FLOAT: tl.constexpr, BITS: tl.constexpr,
            MAN_BITS: tl.constexpr):
    """Codes -> values in ``COMPUTE`` dtype, exactly.

    Integers: ``v = code - zero``, built by adding into the mantissa of a float whose ulp is 1
    (fp16 1536 + v, fp32 1.5 * 2^23 + v; |v| < 512 stays in the binade), then subtracting that float.
    Floats: sign and exponent/mantissa bits are moved into an fp16 pattern; the result is the
    true value times 2^(bias - 15) (subnormals included), the factor being folded into the scale.
    """
    if IS_FLOAT:
        sign = (code >> (BITS - 1)) << 15
        em = (code & ((1 << (BITS - 1)) - 1)) << (10 - MAN_BITS)
        v = (sign | em).to(tl.int16).to(tl.float16, bitcast=True)
        if COMPUTE != tl.float16:
            v = v.to(COMPUTE)
        return v
    if COMPUTE == tl.float16:
        return ((code - zero + (0x6400 + 512)).to(tl.int16).to(tl.float16, bitcast=True) - 1536.0).to(tl.float16)
    return ((code - zero + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0).to(COMPUTE)


def int4_words_asm(compute_is_fp16: bool, symmetric_zero: int | None) -> str:
    """PTX turning two int16 words of 4-bit codes (4 planes each: bits 4j..4j+3 hold plane j) into
    the 4 planes' values, two per output register, in fp16/bf16 (MARLIN's trick on this layout):
    ``(word & 0x000F000F) | magic`` is a half2 whose ulp is 1 (fp16 1024.0, bf16 128.0), and one
    packed subtraction removes that float and, for symmetric schemes, the zero point. fp16 takes
    plane 1 (and 3) unshifted as ``1024 + 16 v`` and removes the factor with one fused multiply-add:
    9 instructions per 8 values (bf16: 11).
    Outputs ``$0..$3`` = planes 0..3; input ``$4`` = the two words."""
    zero = symmetric_zero or 0
    if compute_is_fp16:
        sub, sixteenth, hi_sub = _half_bits(1024 + zero, True), _half_bits_f(1 / 16), _half_bits_f(-(64 + zero))
        lines = [".reg .b32 r, c, d, e;", f"mov.b32 c, 0x{sub:04x}{sub:04x};",
                 f"mov.b32 d, 0x{sixteenth:04x}{sixteenth:04x};", f"mov.b32 e, 0x{hi_sub:04x}{hi_sub:04x};",
                 "shr.u32 r, $4, 8;"]
        for out, src, mask in [(0, "$4", "0x000F000F"), (1, "$4", "0x00F000F0"), (2, "r", "0x000F000F"),
                               (3, "r", "0x00F000F0")]:
            lines.append(f"lop3.b32 ${out}, {src}, {mask}, 0x64006400, 0xEA;")  # (a & b) | c
        lines += ["sub.f16x2 $0, $0, c;", "fma.rn.f16x2 $1, $1, d, e;", "sub.f16x2 $2, $2, c;",
                  "fma.rn.f16x2 $3, $3, d, e;"]
    else:
        sub = _half_bits(128 + zero, False)
        lines = [".reg .b32 r, c;", f"mov.b32 c, 0x{sub:04x}{sub:04x};",
                 "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;"]
        for out in (1, 2, 3):
            lines += [f"shr.u32 r, $4, {4 * out};", f"lop3.b32 ${out}, r, 0x000F000F, 0x43004300, 0xEA;"]
        lines += [f"sub.bf16x2 ${i}, ${i}, c;" for i in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


def int8_fp16_asm(symmetric_zero: int | None) -> str:
    """PTX turning 4 uint8 codes (one register) into 4 fp16 values: two byte permutes place each code
    in the mantissa of 1024.0, two packed subtractions remove 1024 (+ the symmetric zero point)."""
    sub_bits = _half_bits(1024 + (symmetric_zero or 0), True)
    return ("{\n.reg .b32 a, b, c;\n"
            f"mov.b32 c, 0x{sub_bits:04x}{sub_bits:04x};\n"
            "prmt.b32 a, $2, 0x64646464, 0x5140;\n"
            "prmt.b32 b, $2, 0x64646464, 0x7362;\n"
            "sub.f16x2 $0, a, c;\nsub.f16x2 $1, b, c;\n}")


def e4m3_fp16_asm() -> str:
    """PTX turning 4 fp8 e4m3 codes (one register) into 4 fp16 values with the hardware's exact
    paired conversion (sm_89+): the true values, so the float decode factor is 1."""
    return ("{\n.reg .b16 lo, hi;\n"
            "mov.b32 {lo, hi}, $2;\n"
            "cvt.rn.f16x2.e4m3x2 $0, lo;\n"
            "cvt.rn.f16x2.e4m3x2 $1, hi;\n}")


def _half_bits_f(value: float) -> int:
    import struct

    return struct.unpack("<H", struct.pack("<e", value))[0]


def _half_bits(value: int, fp16: bool) -> int:
    import struct

    if fp16:
        return struct.unpack("<H", struct.pack("<e", float(value)))[0]
    return struct.unpack("<I", struct.pack("<f", float(value)))[0] >> 16  # exact: small integers


@triton.jit
def _scale_values(scales_ptr, zeros_ptr, g, n_groups, rows, row_mask, N, SYMMETRIC: tl.constexpr,
                  SCALE_MX: tl.constexpr, OFFSET: tl.constexpr, FLOAT_FACTOR: tl.constexpr):
    """float32 scales (times the float decode factor) and integer zero points of group(s) ``g`` for
    ``rows`` (a ``[BLOCK_N, 1]`` column): ``[BLOCK_N, 1]`` for one group, ``[BLOCK_N, D]`` for a
    ``[1, D]`` row of groups. Groups past the last one (K padding, whose x is zero) read the last."""
    g = tl.minimum(g, n_groups - 1)
    if SCALE_MX:
        e = tl.load(scales_ptr + g * N + rows, mask=row_mask, other=127).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
    else:
        s = tl.load(scales_ptr + g * N + rows, mask=row_mask, other=0.0).to(tl.float32)
    s = s * FLOAT_FACTOR
    if SYMMETRIC:
        z = tl.full(s.shape, OFFSET, tl.int32)
    else:
        z = tl.load(zeros_ptr + g * N + rows, mask=row_mask, other=0).to(tl.int32)
    return s, z


@triton.jit
def lowbit_matmul_kernel(
    x_ptr, seg0_ptr, seg1_ptr, seg2_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om, stride_w0, stride_w1, stride_w2, k_tiles_per_split, n_groups, split_k,
    BITS: tl.constexpr, SEG0: tl.constexpr, SEG1: tl.constexpr, SEG2: tl.constexpr, PD: tl.constexpr,
    IS_FLOAT: tl.constexpr, MAN_BITS: tl.constexpr, FLOAT_FACTOR: tl.constexpr,
    SYMMETRIC: tl.constexpr, OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_MX: tl.constexpr,
    HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, ASM4: tl.constexpr, ASM8: tl.constexpr,
    SCALE_IN_COMPUTE: tl.constexpr, EVEN_K: tl.constexpr, ROW_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SWAP_AB: tl.constexpr,
):
    TILE_K: tl.constexpr = 128
    NP: tl.constexpr = TILE_K // PD  # planes per tile
    PER_CHANNEL: tl.constexpr = GROUP_SIZE == -1
    TILE_SCALE: tl.constexpr = GROUP_SIZE >= TILE_K

    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m_tiles  # m fastest: programs sharing a weight tile run together (L2 reuse)
    pid_m = pid % num_m_tiles
    pid_k = tl.program_id(1)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = tl.arange(0, PD)
    n_mask = rn < N
    m_mask = rm < M

    k_tiles = tl.cdiv(K, TILE_K)
    t_start = pid_k * k_tiles_per_split
    t_end = tl.minimum(t_start + k_tiles_per_split, k_tiles)

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if PER_CHANNEL:
        s_tile, z_tile = _scale_values(scales_ptr, zeros_ptr, 0, n_groups, rn[:, None], n_mask[:, None], N, SYMMETRIC,
                                       SCALE_MX, OFFSET, FLOAT_FACTOR)

    for t in range(t_start, t_end):
        w0 = tl.load(seg0_ptr + _word_offsets(rn, t, rp, stride_w0, PD, ROW_BLOCK), mask=n_mask[:, None], other=0,
                     eviction_policy="evict_first")
        w1 = w0
        w2 = w0
        if SEG1 > 0:
            w1 = tl.load(seg1_ptr + _word_offsets(rn, t, rp, stride_w1, PD, ROW_BLOCK), mask=n_mask[:, None], other=0,
                         eviction_policy="evict_first")
        if SEG2 > 0:
            w2 = tl.load(seg2_ptr + _word_offsets(rn, t, rp, stride_w2, PD, ROW_BLOCK), mask=n_mask[:, None], other=0,
                         eviction_policy="evict_first")
        if TILE_SCALE:  # one group per row for the whole tile: scale the tile's partial product instead
            s_tile, z_tile = _scale_values(scales_ptr, zeros_ptr, (t * TILE_K) // GROUP_SIZE, n_groups, rn[:, None],
                                           n_mask[:, None], N, SYMMETRIC, SCALE_MX, OFFSET, FLOAT_FACTOR)
            part = tl.zeros(acc.shape, dtype=tl.float32)
        else:
            part = acc
        if ASM4 != "":  # (dtype tuples must hold plain dtypes, not the COMPUTE constexpr)
            if COMPUTE == tl.float16:
                planes = tl.inline_asm_elementwise(ASM4, "=r,=r,=r,=r,r", [w0], is_pure=True, pack=2,
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16))
            else:
                planes = tl.inline_asm_elementwise(ASM4, "=r,=r,=r,=r,r", [w0], is_pure=True, pack=2,
                                                   dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16))
        for j in tl.static_range(NP):
            k0 = t * TILE_K + j * PD
            if not PER_CHANNEL:
                if not TILE_SCALE:
                    if GROUP_SIZE >= PD:  # one group per plane
                        g = k0 // GROUP_SIZE
                    else:  # several groups in a plane: per-element scales
                        g = ((k0 + rp) // GROUP_SIZE)[None, :]
                    s_tile, z_tile = _scale_values(scales_ptr, zeros_ptr, g, n_groups, rn[:, None], n_mask[:, None], N,
                                                   SYMMETRIC, SCALE_MX, OFFSET, FLOAT_FACTOR)
            if ASM4 != "":
                w = planes[j]
            elif ASM8 != "":
                w = tl.inline_asm_elementwise(ASM8, "=r,=r,r", [w0], dtype=tl.float16, is_pure=True, pack=4)
            else:
                w = _decode(_extract_codes(w0, w1, w2, j, SEG0, SEG1, SEG2), z_tile, COMPUTE, IS_FLOAT,
                            BITS, MAN_BITS)
            if ASM4 != "" or ASM8 != "":
                if not SYMMETRIC:  # the asm left ``code``; the zero point varies per row
                    w = w - z_tile.to(COMPUTE)
            if not PER_CHANNEL:
                if not TILE_SCALE:
                    if SCALE_IN_COMPUTE:
                        w = w * s_tile.to(COMPUTE)
                    else:
                        w = (w.to(tl.float32) * s_tile).to(COMPUTE)
            rk = k0 + rp
            if SWAP_AB:
                if EVEN_K:  # no mask along k: the loads stay vectorized and the pipeliner makes them async
                    xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None], mask=m_mask[None, :], other=0.0)
                else:
                    xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None],
                                 mask=m_mask[None, :] & (rk[:, None] < K), other=0.0)
                part = tl.dot(w, xt.to(COMPUTE), part)
            else:
                if EVEN_K:
                    xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None], other=0.0)
                else:
                    xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                                 mask=m_mask[:, None] & (rk[None, :] < K), other=0.0)
                part = tl.dot(xs.to(COMPUTE), tl.trans(w), part)
        if TILE_SCALE:
            if SWAP_AB:
                acc += part * s_tile
            else:
                acc += part * tl.trans(s_tile)
        else:
            acc = part

    if PER_CHANNEL:
        if SWAP_AB:
            acc = acc * s_tile
        else:
            acc = acc * tl.trans(s_tile)

    # Offsets of the output tile, in the accumulator's orientation.
    if SWAP_AB:
        o_off = rm[None, :] * stride_om + rn[:, None]
        p_off = rm[None, :] * N + rn[:, None]
        o_mask = m_mask[None, :] & n_mask[:, None]
    else:
        o_off = rm[:, None] * stride_om + rn[None, :]
        p_off = rm[:, None] * N + rn[None, :]
        o_mask = m_mask[:, None] & n_mask[None, :]

    if split_k > 1:
        tl.store(partial_ptr + pid_k * M * N + p_off, acc, mask=o_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel")
        if arrived == split_k - 1:
            tl.debug_barrier()
            acc = tl.load(partial_ptr + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            for s in range(1, split_k):
                acc += tl.load(partial_ptr + s * M * N + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            _store_output(acc, bias_ptr, out_ptr, o_off, o_mask, rn, n_mask, HAS_BIAS, SWAP_AB)
            tl.atomic_xchg(counter_ptr + pid, 0)
    else:
        _store_output(acc, bias_ptr, out_ptr, o_off, o_mask, rn, n_mask, HAS_BIAS, SWAP_AB)


@triton.jit
def _store_output(acc, bias_ptr, out_ptr, o_off, o_mask, rn, n_mask, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr):
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        if SWAP_AB:
            acc = acc + b[:, None]
        else:
            acc = acc + b[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def lowbit_dequant_kernel(
    seg0_ptr, seg1_ptr, seg2_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, stride_w0, stride_w1, stride_w2, n_groups,
    BITS: tl.constexpr, SEG0: tl.constexpr, SEG1: tl.constexpr, SEG2: tl.constexpr, PD: tl.constexpr,
    IS_FLOAT: tl.constexpr, MAN_BITS: tl.constexpr, FLOAT_FACTOR: tl.constexpr,
    SYMMETRIC: tl.constexpr, OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_MX: tl.constexpr,
    COMPUTE: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[N, K]`` = the weight in ``COMPUTE`` dtype (as ``QuantizedWeight.dequantize(COMPUTE)``)."""
    TILE_K: tl.constexpr = 128
    NP: tl.constexpr = TILE_K // PD
    t = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rp = tl.arange(0, PD)
    n_mask = rn < N
    w0 = tl.load(seg0_ptr + _word_offsets(rn, t, rp, stride_w0, PD, ROW_BLOCK), mask=n_mask[:, None], other=0)
    w1 = w0
    w2 = w0
    if SEG1 > 0:
        w1 = tl.load(seg1_ptr + _word_offsets(rn, t, rp, stride_w1, PD, ROW_BLOCK), mask=n_mask[:, None], other=0)
    if SEG2 > 0:
        w2 = tl.load(seg2_ptr + _word_offsets(rn, t, rp, stride_w2, PD, ROW_BLOCK), mask=n_mask[:, None], other=0)
    for j in tl.static_range(NP):
        k0 = t * TILE_K + j * PD
        if GROUP_SIZE == -1:
            g = 0
        elif GROUP_SIZE >= PD:
            g = k0 // GROUP_SIZE
        else:
            g = ((k0 + rp) // GROUP_SIZE)[None, :]
        s, z = _scale_values(scales_ptr, zeros_ptr, g, n_groups, rn[:, None], n_mask[:, None], N, SYMMETRIC, SCALE_MX,
                             OFFSET, FLOAT_FACTOR)
        v = _decode(_extract_codes(w0, w1, w2, j, SEG0, SEG1, SEG2), z, COMPUTE, IS_FLOAT, BITS, MAN_BITS)
        w = (v.to(tl.float32) * s).to(COMPUTE)
        rk = k0 + rp
        tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=n_mask[:, None] & (rk[None, :] < K))
