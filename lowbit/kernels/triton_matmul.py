"""Triton kernels: fused low-bit-weight matmul, and dequantization (for the prefill path).

Both read the ``tiled-planes-v4`` layout (see :mod:`lowbit.pack`): a weight tile of ``BLOCK_N``
rows x 128 stored columns is one ``[BLOCK_N, D]`` word tile per bit segment (contiguous per
16-row block; :func:`_load_words`); plane ``j`` (D consecutive k) is decoded to fp16/bf16 by the
inline-PTX decoders of :mod:`.decoders` on a GPU (plain Triton in the interpreter: :func:`_extract_codes`,
:func:`_decode`), with bit tricks and no int-to-float conversion, and fed to ``tl.dot``. Scales
multiply the fp32 partial product of a group's planes (or each weight, for groups shallower
than a plane); zero points come off the partial product through the sums of x. 2:4 sparse
weights are expanded to the dense operand in registers (:func:`_expand_2of4`).

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
def _load_words(ptr, rn, t, stride, n_mask, SEG: tl.constexpr, PD: tl.constexpr, ROW_BLOCK: tl.constexpr,
                BLOCK_N: tl.constexpr, STREAM: tl.constexpr):
    """The ``[BLOCK_N, PD]`` word tile of k-tile ``t`` of a ``SEG``-bit segment; a 1-bit segment's 4-bit
    words are stored two to a byte and split here (in registers: their join keeps each thread's bytes)."""
    policy: tl.constexpr = "evict_first" if STREAM else ""
    if SEG * 128 // PD == 4:
        rh = tl.arange(0, PD // 2)
        b = tl.load(ptr + _word_offsets(rn, t, rh, stride, PD // 2, ROW_BLOCK), mask=n_mask[:, None], other=0,
                    eviction_policy=policy)
        return tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, PD))
    return tl.load(ptr + _word_offsets(rn, t, tl.arange(0, PD), stride, PD, ROW_BLOCK), mask=n_mask[:, None], other=0,
                   eviction_policy=policy)


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
def _group_of(rk, GROUP_SIZE: tl.constexpr):
    """Scale group(s) ``[1, D]`` of input columns ``rk`` (0 for per-channel scales)."""
    if GROUP_SIZE == -1:
        return tl.zeros_like(rk)[None, :]
    return (rk // GROUP_SIZE)[None, :]


@triton.jit
def _sparse_columns(k0, rp):
    """Dense input columns of a 2:4 plane starting at ``k0`` for its stored columns ``rp``: the first
    column of each stored value's group, and the columns of its dense pair 0-1 (pair 2-3: + 2)."""
    group = k0 + 4 * (rp // 2)
    return group, group + rp % 2


@triton.jit
def _tile_group_scales(scales_ptr, zeros_ptr, t, n_groups, rn, n_mask, N, KT: tl.constexpr, GROUPS: tl.constexpr,
                       SYMMETRIC: tl.constexpr, SCALE_MX: tl.constexpr, OFFSET: tl.constexpr,
                       FLOAT_FACTOR: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Scales and zero points of the ``GROUPS`` groups of k-tile ``t``: two tuples of ``[BLOCK_N, 1]``."""
    scales = ()
    zeros = ()
    for i in tl.static_range(GROUPS):
        s, z = _scale_values(scales_ptr, zeros_ptr, (t * KT) // GROUP_SIZE + i, n_groups, rn[:, None],
                             n_mask[:, None], N, SYMMETRIC, SCALE_MX, OFFSET, FLOAT_FACTOR)
        scales = scales + (s,)
        zeros = zeros + (z,)
    return scales, zeros


@triton.jit
def _asm_planes(ASMP: tl.constexpr, ASMP_REGS: tl.constexpr, w0, w1, w2, NP: tl.constexpr, COMPUTE: tl.constexpr):
    """The planes of a word tile through :func:`lowbit.kernels.decoders.planes_asm` (4 k per call)."""
    return tl.inline_asm_elementwise(ASMP, ASMP_REGS, [w0, w1, w2], dtype=(COMPUTE.value,) * NP, is_pure=True,
                                     pack=4)


@triton.jit
def _expand_2of4(v, case, BLOCK_N: tl.constexpr, PD: tl.constexpr):
    """The dense weights of a plane of 2:4 kept values ``v [BLOCK_N, PD]`` (plain Triton; the PTX
    decoder does the same with byte permutes): stored columns 2g, 2g+1 hold group g's values v0 v1
    and the cases c0 c1 of :mod:`lowbit.pack`. Returns (the dense pairs 0-1 of every group, the
    pairs 2-3), each ``[BLOCK_N, PD]``: columns 2g, 2g+1 hold group g's positions 0, 1 (2, 3)."""
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, PD // 2, 2)))
    c0, c1 = tl.split(tl.reshape(case, (BLOCK_N, PD // 2, 2)))
    zero = tl.zeros_like(v0)
    # pair 0-1: v0 v1 | v0 0 | 0 v0 | 0 0 (c0 = 0..3); pair 2-3: 0 0 | v1 0 | 0 v1 | v0 v1 (c1 = 0..3)
    d0 = tl.where(c0 <= 1, v0, zero)
    d1 = tl.where(c0 == 0, v1, tl.where(c0 == 2, v0, zero))
    d2 = tl.where(c1 == 1, v1, tl.where(c1 == 3, v0, zero))
    d3 = tl.where(c1 >= 2, v1, zero)
    return tl.reshape(tl.join(d0, d1), (BLOCK_N, PD)), tl.reshape(tl.join(d2, d3), (BLOCK_N, PD))


@triton.jit
def _join_planes(planes, first: tl.constexpr, COUNT: tl.constexpr, BLOCK_N: tl.constexpr, PD: tl.constexpr):
    """Planes ``first .. first + COUNT - 1`` (each ``[BLOCK_N, PD]``, consecutive k) as one
    ``[BLOCK_N, COUNT * PD]`` operand in k order: joined on a new axis that is then moved before the
    columns, so each thread keeps its registers (no shuffle, no trip through shared memory)."""
    tl.static_assert(COUNT == 1 or COUNT == 2 or COUNT == 4, "a tile has 1, 2 or 4 planes per scale group")
    if COUNT == 1:
        w = planes[first]
    elif COUNT == 2:
        w = tl.reshape(tl.permute(tl.join(planes[first], planes[first + 1]), (0, 2, 1)), (BLOCK_N, 2 * PD))
    else:  # [r, c, i, j] holds plane first + i + 2 j
        both = tl.join(tl.join(planes[first], planes[first + 1]), tl.join(planes[first + 2], planes[first + 3]))
        w = tl.reshape(tl.permute(both, (0, 3, 2, 1)), (BLOCK_N, 4 * PD))
    return w


@triton.jit
def _plane_product(w, rk, s, part, x_ptr, rm, m_mask, stride_xm, K, ELEMENT_SCALE: tl.constexpr,
                   SCALE_IN_COMPUTE: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """``part`` plus the product of the weight plane ``w [BLOCK_N, D]`` (or of planes joined along k:
    input columns ``rk``) and x (``w`` times the scales ``s [BLOCK_N, D]`` first, for groups
    shallower than a plane)."""
    if ELEMENT_SCALE:
        if SCALE_IN_COMPUTE:
            w = w * s.to(COMPUTE)
        else:
            w = (w.to(tl.float32) * s).to(COMPUTE)
    if SWAP_AB:
        if EVEN_K:  # no mask along k: the loads stay vectorized and the pipeliner makes them async
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None], mask=m_mask[None, :], other=0.0)
        else:
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None], mask=m_mask[None, :] & (rk[:, None] < K),
                         other=0.0)
        part = tl.dot(w, xt.to(COMPUTE), part)
    else:
        if EVEN_K:
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None], other=0.0)
        else:
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K),
                         other=0.0)
        part = tl.dot(xs.to(COMPUTE), tl.trans(w), part)
    return part


@triton.jit
def _x_sums(xsums_ptr, stride_xs, rm, m_mask, block, SWAP_AB: tl.constexpr):
    """Row ``block`` of the sums of x (``[blocks, M]``, :func:`lowbit.kernels.dispatch.x_sums`):
    ``[1, BLOCK_M]`` (``[BLOCK_M, 1]`` unswapped), contiguous along the tokens."""
    if SWAP_AB:
        sums = tl.load(xsums_ptr + block * stride_xs + rm[None, :], mask=m_mask[None, :], other=0.0)
    else:
        sums = tl.load(xsums_ptr + block * stride_xs + rm[:, None], mask=m_mask[:, None], other=0.0)
    return sums


@triton.jit
def _tile_x_sums(xsums_ptr, stride_xs, rm, m_mask, t, BLOCKS: tl.constexpr, SWAP_AB: tl.constexpr):
    """The sums of x of the ``BLOCKS`` groups of k-tile ``t``: a tuple."""
    sums = ()
    for i in tl.static_range(BLOCKS):
        sums = sums + (_x_sums(xsums_ptr, stride_xs, rm, m_mask, t * BLOCKS + i, SWAP_AB),)
    return sums


@triton.jit
def _minus_zero_sums(part, z, xsum, SWAP_AB: tl.constexpr):
    """``part - z * sum_k x``: zero points ``z [BLOCK_N, 1]`` (codes) off a product of raw codes
    (``xsum``: the sums of x, ``[1, BLOCK_M]``, or ``[BLOCK_M, 1]`` unswapped)."""
    if SWAP_AB:
        out = part - z.to(tl.float32) * xsum
    else:
        out = part - xsum * tl.trans(z.to(tl.float32))
    return out


@triton.jit
def _times_row_scales(v, s, SWAP_AB: tl.constexpr):
    """``v`` (in the accumulator's orientation) times the per-row scales ``s [BLOCK_N, 1]``."""
    if SWAP_AB:
        out = v * s
    else:
        out = v * tl.trans(s)
    return out


@triton.jit
def lowbit_matmul_kernel(
    x_ptr, seg0_ptr, seg1_ptr, seg2_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, xsums_ptr,
    M, N, K, stride_xm, stride_om, stride_w0, stride_w1, stride_w2, stride_xs, k_tiles_per_split, n_groups, split_k,
    BITS: tl.constexpr, SEG0: tl.constexpr, SEG1: tl.constexpr, SEG2: tl.constexpr, PD: tl.constexpr,
    IS_FLOAT: tl.constexpr, MAN_BITS: tl.constexpr, FLOAT_FACTOR: tl.constexpr,
    SYMMETRIC: tl.constexpr, OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_MX: tl.constexpr,
    HAS_X_SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, ASM4: tl.constexpr, ASM8: tl.constexpr,
    ASMP: tl.constexpr, ASMP_REGS: tl.constexpr, SCALE_IN_COMPUTE: tl.constexpr, EVEN_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    SPARSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SWAP_AB: tl.constexpr,
    MERGE_PLANES: tl.constexpr,
):
    TILE_K: tl.constexpr = 128
    NP: tl.constexpr = TILE_K // PD  # planes per tile
    # 2:4 sparse: a tile of 128 stored columns is 256 dense k, a plane of PD stored columns 2*PD.
    KT: tl.constexpr = 2 * TILE_K if SPARSE else TILE_K
    DPD: tl.constexpr = 2 * PD if SPARSE else PD
    PER_CHANNEL: tl.constexpr = GROUP_SIZE == -1
    # Groups at least a plane deep scale the partial product of their planes (fp32, once per
    # accumulator element); shallower groups scale every weight.
    GROUP_SCALE: tl.constexpr = (not PER_CHANNEL) and GROUP_SIZE >= DPD
    ELEMENT_SCALE: tl.constexpr = (not PER_CHANNEL) and GROUP_SIZE < DPD
    PLANES_PER_GROUP: tl.constexpr = (KT if GROUP_SIZE >= KT else GROUP_SIZE) // DPD if GROUP_SCALE else NP
    # Zero points of whole groups (or rows) leave the weights as raw codes and come off the partial
    # product: sum_k (q - z) x = sum_k q x - z sum_k x, with the sums of x over each group (at most a
    # tile; per-channel: over each split's k) computed once per call (``xsums``, see
    # :func:`lowbit.kernels.dispatch.x_sums`) and loaded a tile ahead. (A product with ones on the
    # matrix unit cost a second dot and a wgmma wait per group; sums across threads in the kernel,
    # shuffles and a layout conversion per plane: run 21.) Not for 2:4 weights: their pruned entries
    # are 0, not q = z (zero points meet the kept codes instead).
    ZERO_BY_SUMS: tl.constexpr = (not SYMMETRIC) and (not ELEMENT_SCALE) and (not SPARSE)
    tl.static_assert(ZERO_BY_SUMS == HAS_X_SUMS, "dispatch.x_sums and the kernel disagree on zero-point sums")
    GROUPS_PER_TILE: tl.constexpr = NP // PLANES_PER_GROUP if GROUP_SCALE else 0
    # One matrix product per scale group (per-channel: per tile), its planes joined along k, instead
    # of one per plane: Triton waits for each product whose weight operand is in registers before the
    # next, so this is one wait per group instead of per plane, at the price of the group's decoded
    # planes all live at once (int4-g128 128x16 tiles: 95 -> 127 registers). Dense weights whose
    # scales multiply partial products of two or more planes only (:func:`~.dispatch.merges_planes`).
    GROUP_PLANES: tl.constexpr = PLANES_PER_GROUP if GROUP_SCALE else NP
    MERGE: tl.constexpr = MERGE_PLANES and GROUP_PLANES > 1 and (not SPARSE) and (not ELEMENT_SCALE)
    PLANES_PER_PRODUCT: tl.constexpr = GROUP_PLANES if MERGE else 1

    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m_tiles  # m fastest: programs sharing a weight tile run together (L2 reuse)
    pid_m = pid % num_m_tiles
    pid_k = tl.program_id(1)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = tl.arange(0, PD)
    rd = tl.arange(0, PLANES_PER_PRODUCT * DPD)  # dense k of a product's planes (one, or a merged group's)
    n_mask = rn < N
    m_mask = rm < M

    k_tiles = tl.cdiv(K, KT)
    t_start = pid_k * k_tiles_per_split
    t_end = tl.minimum(t_start + k_tiles_per_split, k_tiles)

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if ZERO_BY_SUMS:  # sum_k x of the current group (per-channel: of the split's k)
        if PER_CHANNEL:
            xsum = _x_sums(xsums_ptr, stride_xs, rm, m_mask, pid_k, SWAP_AB)
        else:
            xs_next = _tile_x_sums(xsums_ptr, stride_xs, rm, m_mask, t_start, GROUPS_PER_TILE, SWAP_AB)
    if PER_CHANNEL:
        s_tile, z_tile = _scale_values(scales_ptr, zeros_ptr, 0, n_groups, rn[:, None], n_mask[:, None], N, SYMMETRIC,
                                       SCALE_MX, OFFSET, FLOAT_FACTOR)

    # Groups of at least a plane: a tile's group scales (a tuple of [BLOCK_N, 1]) are loaded a tile ahead
    # (the pipeliner only prefetches dot operands; a scale load in the loop stalled every iteration on
    # DRAM latency, ncu).
    if GROUP_SCALE:
        s_next, z_next = _tile_group_scales(scales_ptr, zeros_ptr, t_start, n_groups, rn, n_mask, N, KT,
                                            GROUPS_PER_TILE, SYMMETRIC, SCALE_MX, OFFSET, FLOAT_FACTOR, GROUP_SIZE)
    for t in range(t_start, t_end):
        if GROUP_SCALE:
            s_groups, z_groups = s_next, z_next
            s_next, z_next = _tile_group_scales(scales_ptr, zeros_ptr, t + 1, n_groups, rn, n_mask, N, KT,
                                                GROUPS_PER_TILE, SYMMETRIC, SCALE_MX, OFFSET, FLOAT_FACTOR, GROUP_SIZE)
        if ZERO_BY_SUMS and GROUP_SCALE:
            xs_groups = xs_next
            xs_next = _tile_x_sums(xsums_ptr, stride_xs, rm, m_mask, tl.minimum(t + 1, k_tiles - 1), GROUPS_PER_TILE,
                                   SWAP_AB)
        w0 = _load_words(seg0_ptr, rn, t, stride_w0, n_mask, SEG0, PD, ROW_BLOCK, BLOCK_N, True)
        w1 = w0
        w2 = w0
        if SEG1 > 0:
            w1 = _load_words(seg1_ptr, rn, t, stride_w1, n_mask, SEG1, PD, ROW_BLOCK, BLOCK_N, True)
        if SEG2 > 0:
            w2 = _load_words(seg2_ptr, rn, t, stride_w2, n_mask, SEG2, PD, ROW_BLOCK, BLOCK_N, True)
        if not GROUP_SCALE:
            part = acc
        if ASM4 != "":  # (a dtype tuple holds plain dtypes: COMPUTE.value, not the constexpr)
            planes = tl.inline_asm_elementwise(ASM4, "=r,=r,=r,=r,r", [w0], dtype=(COMPUTE.value,) * NP, is_pure=True,
                                               pack=2)
        elif ASMP != "":
            # 2:4: two dense halves per plane (every group's positions 0-1, then 2-3). The decoder
            # needs a group's two stored columns in one call: Triton keeps consecutive column pairs
            # in adjacent registers in the layouts it picks here (blocked loads, kWidth-2 operands);
            # the GPU tests over configs and the tuner's output check guard that.
            planes = _asm_planes(ASMP, ASMP_REGS, w0, w1, w2, 2 * NP if SPARSE else NP, COMPUTE)
        if MERGE and ASM4 == "" and ASMP == "":  # plain Triton: every plane decoded first, to be joined
            planes = ()  # (zero points here are symmetric or come off through the sums of x)
            for j in tl.static_range(NP):
                planes = planes + (_decode(_extract_codes(w0, w1, w2, j, SEG0, SEG1, SEG2),
                                           0 if ZERO_BY_SUMS else OFFSET, COMPUTE, IS_FLOAT, BITS, MAN_BITS),)
        for j in tl.static_range(0, NP, PLANES_PER_PRODUCT):  # j: the product's first plane
            k0 = t * KT + j * DPD
            if GROUP_SCALE:
                if j % PLANES_PER_GROUP == 0:
                    s_tile, z_tile = s_groups[j // PLANES_PER_GROUP], z_groups[j // PLANES_PER_GROUP]
                    part = tl.zeros(acc.shape, dtype=tl.float32)
                    if ZERO_BY_SUMS:
                        xsum = xs_groups[j // PLANES_PER_GROUP]
            if ELEMENT_SCALE:  # several groups in a plane: per-element scales
                if SPARSE:  # zero points meet the kept values before expansion: by stored column
                    _, z_tile = _scale_values(scales_ptr, zeros_ptr, _group_of(_sparse_columns(k0, rp)[0], GROUP_SIZE),
                                              n_groups, rn[:, None], n_mask[:, None], N, SYMMETRIC, SCALE_MX, OFFSET,
                                              FLOAT_FACTOR)
                else:
                    s_tile, z_tile = _scale_values(scales_ptr, zeros_ptr, _group_of(k0 + rd, GROUP_SIZE), n_groups,
                                                   rn[:, None], n_mask[:, None], N, SYMMETRIC, SCALE_MX, OFFSET,
                                                   FLOAT_FACTOR)
            if SPARSE:
                if ASMP != "":
                    w, w_g1 = planes[2 * j], planes[2 * j + 1]
                else:
                    code = _extract_codes(w0, w1, w2, j, SEG0, SEG1, SEG2)  # value << 2 | position case
                    w, w_g1 = _expand_2of4(_decode(code >> 2, z_tile, COMPUTE, IS_FLOAT, BITS, MAN_BITS), code & 3,
                                             BLOCK_N, PD)
                # w: the dense pairs 0-1 of the plane's groups (dense k 4g, 4g+1), w_g1: the pairs 2-3
                _, rk = _sparse_columns(k0, rp)
                if ELEMENT_SCALE:
                    s_tile, _ = _scale_values(scales_ptr, zeros_ptr, _group_of(rk, GROUP_SIZE), n_groups,
                                              rn[:, None], n_mask[:, None], N, True, SCALE_MX, OFFSET, FLOAT_FACTOR)
                    s_g1, _ = _scale_values(scales_ptr, zeros_ptr, _group_of(rk + 2, GROUP_SIZE), n_groups,
                                            rn[:, None], n_mask[:, None], N, True, SCALE_MX, OFFSET, FLOAT_FACTOR)
                else:
                    s_g1 = s_tile
                part = _plane_product(w, rk, s_tile, part, x_ptr, rm, m_mask, stride_xm, K, ELEMENT_SCALE,
                                      SCALE_IN_COMPUTE, EVEN_K, SWAP_AB, COMPUTE)
                part = _plane_product(w_g1, rk + 2, s_g1, part, x_ptr, rm, m_mask, stride_xm, K, ELEMENT_SCALE,
                                      SCALE_IN_COMPUTE, EVEN_K, SWAP_AB, COMPUTE)
            else:
                if MERGE:
                    w = _join_planes(planes, j, PLANES_PER_PRODUCT, BLOCK_N, PD)
                elif ASM4 != "" or ASMP != "":
                    w = planes[j]
                elif ASM8 != "":
                    w = tl.inline_asm_elementwise(ASM8, "=r,=r,r", [w0], dtype=tl.float16, is_pure=True, pack=4)
                else:
                    w = _decode(_extract_codes(w0, w1, w2, j, SEG0, SEG1, SEG2), 0 if ZERO_BY_SUMS else z_tile,
                                COMPUTE, IS_FLOAT, BITS, MAN_BITS)
                if ASM4 != "" or ASM8 != "" or ASMP != "":
                    if not SYMMETRIC and not ZERO_BY_SUMS:  # the asm left ``code``; the zero point varies per row
                        w = w - z_tile.to(COMPUTE)
                part = _plane_product(w, k0 + rd, s_tile, part, x_ptr, rm, m_mask, stride_xm, K, ELEMENT_SCALE,
                                      SCALE_IN_COMPUTE, EVEN_K, SWAP_AB, COMPUTE)
            if GROUP_SCALE:
                if (j + PLANES_PER_PRODUCT) % PLANES_PER_GROUP == 0:
                    if ZERO_BY_SUMS:
                        part = _minus_zero_sums(part, z_tile, xsum, SWAP_AB)
                    acc += _times_row_scales(part, s_tile, SWAP_AB)
        if not GROUP_SCALE:
            acc = part

    if PER_CHANNEL:
        if ZERO_BY_SUMS:
            acc = _minus_zero_sums(acc, z_tile, xsum, SWAP_AB)
        acc = _times_row_scales(acc, s_tile, SWAP_AB)

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
    COMPUTE: tl.constexpr, ROW_BLOCK: tl.constexpr, SPARSE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[N, K]`` = the weight in ``COMPUTE`` dtype (as ``QuantizedWeight.dequantize(COMPUTE)``);
    2:4 weights expanded as the fused kernel does (:func:`_expand_2of4`)."""
    TILE_K: tl.constexpr = 128
    NP: tl.constexpr = TILE_K // PD
    KT: tl.constexpr = 2 * TILE_K if SPARSE else TILE_K  # dense k of a stored tile
    DPD: tl.constexpr = 2 * PD if SPARSE else PD
    t = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rp = tl.arange(0, PD)
    n_mask = rn < N
    w0 = _load_words(seg0_ptr, rn, t, stride_w0, n_mask, SEG0, PD, ROW_BLOCK, BLOCK_N, False)
    w1 = w0
    w2 = w0
    if SEG1 > 0:
        w1 = _load_words(seg1_ptr, rn, t, stride_w1, n_mask, SEG1, PD, ROW_BLOCK, BLOCK_N, False)
    if SEG2 > 0:
        w2 = _load_words(seg2_ptr, rn, t, stride_w2, n_mask, SEG2, PD, ROW_BLOCK, BLOCK_N, False)
    for j in tl.static_range(NP):
        k0 = t * KT + j * DPD
        code = _extract_codes(w0, w1, w2, j, SEG0, SEG1, SEG2)
        if SPARSE:  # code = value << 2 | case; a kept value's zero point is its dense column's group's
            group, rk = _sparse_columns(k0, rp)
            _, z = _scale_values(scales_ptr, zeros_ptr, _group_of(group, GROUP_SIZE), n_groups,
                                 rn[:, None], n_mask[:, None], N, SYMMETRIC, SCALE_MX, OFFSET, FLOAT_FACTOR)
            pairs01, pairs23 = _expand_2of4(_decode(code >> 2, z, COMPUTE, IS_FLOAT, BITS, MAN_BITS), code & 3,
                                            BLOCK_N, PD)
            _store_dequantized(pairs01, rk, scales_ptr, zeros_ptr, out_ptr, rn, n_mask, N, K, n_groups, SCALE_MX,
                               OFFSET, FLOAT_FACTOR, GROUP_SIZE, COMPUTE)
            _store_dequantized(pairs23, rk + 2, scales_ptr, zeros_ptr, out_ptr, rn, n_mask, N, K, n_groups, SCALE_MX,
                               OFFSET, FLOAT_FACTOR, GROUP_SIZE, COMPUTE)
        else:
            if GROUP_SIZE == -1:
                g = 0
            elif GROUP_SIZE >= PD:  # one group per plane: one scale per row
                g = k0 // GROUP_SIZE
            else:
                g = ((k0 + rp) // GROUP_SIZE)[None, :]
            s, z = _scale_values(scales_ptr, zeros_ptr, g, n_groups, rn[:, None], n_mask[:, None], N, SYMMETRIC,
                                 SCALE_MX, OFFSET, FLOAT_FACTOR)
            w = (_decode(code, z, COMPUTE, IS_FLOAT, BITS, MAN_BITS).to(tl.float32) * s).to(COMPUTE)
            rk = k0 + rp
            tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=n_mask[:, None] & (rk[None, :] < K))


@triton.jit
def _store_dequantized(v, rk, scales_ptr, zeros_ptr, out_ptr, rn, n_mask, N, K, n_groups, SCALE_MX: tl.constexpr,
                       OFFSET: tl.constexpr, FLOAT_FACTOR: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       COMPUTE: tl.constexpr):
    """``out[rn, rk] = v * scale`` (in float32, rounded once to ``COMPUTE``) for decoded values ``v``."""
    s, _ = _scale_values(scales_ptr, zeros_ptr, _group_of(rk, GROUP_SIZE), n_groups, rn[:, None], n_mask[:, None], N,
                         True, SCALE_MX, OFFSET, FLOAT_FACTOR)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], (v.to(tl.float32) * s).to(COMPUTE),
             mask=n_mask[:, None] & (rk[None, :] < K))
