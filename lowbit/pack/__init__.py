"""Storage layout of low-bit codes, as the kernels read it, and its exact inverse.

Layout ``tiled-planes-v4``
--------------------------
A ``B``-bit code is split into *segments* of 8, 4, 2 and 1 bits, most significant first
(``SEGMENTS[6] == (4, 2)``: bits 5..2, then bits 1..0), so every load stays aligned and no
code straddles a word (the TC-FPx idea), and 3/5/6/7-bit codes take exactly B bits.

K is cut into tiles of ``TILE_K = 128`` input weights (the last tile padded with code 0), and
each tile into ``128 / D`` *planes* of ``D`` consecutive k (:func:`plane_depth`): 1 plane of 128
for 8 bits, 4 of 32 for every other width. For each row and tile a segment of ``s`` bits stores
``D`` words of ``s * 128 / D`` bits (uint8 or int16; the 4-bit words of a 1-bit segment two to a
byte, word ``2c`` in the low nibble of byte ``c``); word ``i`` holds the codes of
``k = 128*t + i + D*j`` at bits ``s*j .. s*j+s-1``. So one shift and mask of the word tile
``[rows, D]`` gives plane ``j``, directly a ``D``-deep operand of the matrix instruction, with no
reshape in the kernel (v4: 32-deep planes for every width; v3's 16-deep planes of formats with a
1-bit segment went through shared memory on their way to the matrix unit).

Rows are stored in blocks of ``ROW_BLOCK = 16``: each segment is a tensor
``[ceil(N / 16), K_padded / 128 * 16 * W]`` (``W`` = :func:`segment_words`: ``D``, or ``D / 2``
bytes of a 1-bit segment) whose row ``b`` holds rows ``16b .. 16b+15`` tile after tile (tile ``t``
of a block is ``16 * W`` contiguous stored words, row-major; rows past N are code 0). A
kernel's tile of 16*r rows is then r contiguous chunks of 256*s bytes instead of 16*r scattered
rows of 16*s bytes, which DRAM serves at full speed (+20 % for int4, measured), and slicing the
second dimension in equal parts still cuts whole tiles.

2:4 sparse codes (``value << 2 | position``, :mod:`lowbit.sparsity`) are stored with their two
position bits recoded (``sparse=True``, v4's change over v3): group ``g``'s stored columns ``2g``
and ``2g+1`` hold ``case0`` and ``case1``, what its dense pair of positions 0-1 holds (``v0 v1``,
``v0 0``, ``0 v0``, ``0 0``) and what the pair 2-3 holds (``0 0``, ``v1 0``, ``0 v1``, ``v0 v1``).
Two byte permutes per pair then build the dense operand in registers, from any two consecutive
stored columns (:func:`lowbit.kernels.decoders.planes_asm`).
"""

from __future__ import annotations

import torch

__all__ = ["TILE_K", "ROW_BLOCK", "LAYOUT", "SEGMENTS", "padded_k", "plane_depth", "code_dtype", "pack_codes",
           "unpack_codes", "segment_dtype", "segment_shape", "segment_words", "row_blocks"]

LAYOUT = "tiled-planes-v4"
TILE_K = 128
ROW_BLOCK = 16

# 10 bits: an 8-bit value and a 2-bit position (2:4 sparse schemes of 8-bit formats), as 4+4+2 so
# that every word fits 16 bits (32-bit words do not fit the fp16 matrix operand's register layout).
SEGMENTS = {10: (4, 4, 2), 8: (8,), 7: (4, 2, 1), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,)}
_WORD_DTYPES = {8: torch.uint8, 16: torch.int16}


def padded_k(k: int) -> int:
    return -(-k // TILE_K) * TILE_K


def plane_depth(bits: int) -> int:
    """k per plane of ``bits``-bit codes: 128 for plain bytes, else 32 (4 planes per tile; 4-bit
    segments in 16-bit words, so the kernels' fast decoders work on 32-bit registers of two words)."""
    return TILE_K if SEGMENTS[bits] == (8,) else 32


def segment_words(bits: int, seg_bits: int) -> int:
    """Stored words per row and tile of the ``seg_bits``-wide segment (a 1-bit segment's 4-bit words
    are stored two to a byte)."""
    return plane_depth(bits) // 2 if seg_bits * TILE_K // plane_depth(bits) == 4 else plane_depth(bits)


def segment_dtype(bits: int, seg_bits: int) -> torch.dtype:
    """Stored word dtype of the ``seg_bits``-wide segment of ``bits``-bit codes."""
    return _WORD_DTYPES[max(8, seg_bits * TILE_K // plane_depth(bits))]


def row_blocks(n: int) -> int:
    """Stored row blocks of ``n`` rows."""
    return -(-n // ROW_BLOCK)


def segment_shape(n: int, k: int, bits: int, seg_bits: int) -> tuple[int, int]:
    """Shape of the packed ``seg_bits``-wide segment tensor of ``bits``-bit codes for a ``[n, k]`` weight."""
    return (row_blocks(n), padded_k(k) // TILE_K * ROW_BLOCK * segment_words(bits, seg_bits))


def _to_row_blocks(words: torch.Tensor, n: int, per_tile: int) -> torch.Tensor:
    """Row-major ``[n, tiles * per_tile]`` stored words -> ``[row_blocks(n), tiles * ROW_BLOCK * per_tile]``."""
    tiles = words.shape[1] // per_tile
    padded = words.new_zeros(row_blocks(n) * ROW_BLOCK, words.shape[1])
    padded[:n] = words
    return padded.view(-1, ROW_BLOCK, tiles, per_tile).transpose(1, 2).reshape(-1, tiles * ROW_BLOCK * per_tile)


def _from_row_blocks(words: torch.Tensor, n: int, per_tile: int) -> torch.Tensor:
    """Inverse of :func:`_to_row_blocks`: ``[n, tiles * per_tile]``."""
    tiles = words.shape[1] // (ROW_BLOCK * per_tile)
    return words.view(-1, tiles, ROW_BLOCK, per_tile).transpose(1, 2).reshape(-1, tiles * per_tile)[:n]


def _segment_shifts(bits: int) -> list[tuple[int, int]]:
    """(width, right shift of the code) per segment, most significant first."""
    out, shift = [], bits
    for s in SEGMENTS[bits]:
        shift -= s
        out.append((s, shift))
    return out


def _recode_positions(c: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Position bits of 2:4 codes ``c [N, K]`` (int64, K even) as the kernels' cases, or (``inverse``)
    back: (p0, p1) = (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) <-> (c0, c1) = (0,0) (1,1) (1,2) (2,1) (2,2) (3,3).
    Arithmetic on the codes' device (no table: this also runs inside CUDA graph capture); cases of no
    pair of positions come back as (0, 0), which validation refuses."""
    pairs = c.view(c.shape[0], -1, 2)
    a, b = pairs[..., 0] & 3, pairs[..., 1] & 3
    if not inverse:
        first = torch.where(a == 0, (b >= 2).long(), a + 1)
        second = torch.where(b == 1, 0, torch.where(b == 2, 1, torch.where(a == 2, 3, 2)))
    else:
        middle = (a >= 1) & (a <= 2) & (b >= 1) & (b <= 2)
        valid = ((a == 0) & (b == 0)) | middle | ((a == 3) & (b == 3))
        first = torch.where(valid, (a - 1).clamp(min=0), 0)
        second = torch.where(valid, torch.where(a == 0, 1, torch.where(a == 3, 3, b + 1)), 0)
    return ((pairs & ~3) | torch.stack([first, second], dim=-1)).view_as(c)


def code_dtype(bits: int) -> torch.dtype:
    """dtype of unpacked ``bits``-bit codes: uint8 up to 8 bits, int16 above."""
    return torch.uint8 if bits <= 8 else torch.int16


def pack_codes(codes: torch.Tensor, bits: int, *, sparse: bool = False) -> tuple[torch.Tensor, ...]:
    """``codes [N, K]`` (:func:`code_dtype`, each < 2**bits) -> one tensor per segment, in kernel layout.
    ``sparse``: 2:4 codes ``value << 2 | position`` (positions ascending in each pair of columns)."""
    if bits not in SEGMENTS:
        raise ValueError(f"pack_codes supports {sorted(SEGMENTS)} bits, got {bits}")
    if codes.dtype != code_dtype(bits) or codes.dim() != 2:
        raise ValueError(f"pack_codes expects {code_dtype(bits)} codes of shape [N, K] for {bits} bits, "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.min()) < 0:
        raise ValueError(f"pack_codes: code {int(codes.min())} is negative")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"pack_codes: code {int(codes.max())} is out of range for {bits}-bit codes "
                         f"(0..{(1 << bits) - 1})")
    n, k = codes.shape
    if sparse:  # two stored columns per group, positions ascending (recoding others would corrupt values)
        from ..sparsity import check_positions  # (lowbit.sparsity builds on this module)

        if codes.shape[1] % 2:
            raise ValueError(f"pack_codes(sparse=True): 2:4 codes come two per group, got {codes.shape[1]} columns")
        check_positions(codes.to(torch.int64) & 3)
    kp = padded_k(k)
    c = torch.zeros(n, kp, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes
    if sparse:
        c = _recode_positions(c, inverse=False)
    depth = plane_depth(bits)
    planes = TILE_K // depth
    out = []
    for s, shift in _segment_shifts(bits):
        seg = (c >> shift) & ((1 << s) - 1)
        # [N, tiles, j, i] with k = 128 t + D j + i; word i holds plane j at bits s*j.
        seg = seg.view(n, kp // TILE_K, planes, depth)
        weights = (torch.arange(planes, device=codes.device, dtype=torch.int64) * s).view(1, 1, -1, 1)
        words = (seg << weights).sum(dim=2)  # disjoint bit fields: sum == or
        dtype = segment_dtype(bits, s)
        if dtype != torch.uint8:  # two's complement for the signed word types
            width = s * planes
            words = torch.where(words >= (1 << (width - 1)), words - (1 << width), words)
        stored = segment_words(bits, s)
        words = words.reshape(n, kp // TILE_K * depth)
        if stored != depth:  # 4-bit words, two to a byte
            pairs = words.view(n, -1, 2)
            words = pairs[..., 0] | (pairs[..., 1] << 4)
        out.append(_to_row_blocks(words.to(dtype), n, stored).contiguous())
    return tuple(out)


def unpack_codes(packed: tuple[torch.Tensor, ...], bits: int, k: int, *, rows: int,
                 sparse: bool = False) -> torch.Tensor:
    """Exact inverse of :func:`pack_codes`: ``[rows, k]`` codes of :func:`code_dtype`. (2:4 position
    cases that no pair of positions has come back as positions (0, 0), which validation refuses.)"""
    if bits not in SEGMENTS or len(packed) != len(SEGMENTS[bits]):
        raise ValueError(f"{bits}-bit codes need {len(SEGMENTS.get(bits, ()))} packed segments, got {len(packed)}")
    kp = padded_k(k)
    depth = plane_depth(bits)
    planes = TILE_K // depth
    code = torch.zeros(rows, kp, dtype=code_dtype(bits), device=packed[0].device)
    for (s, shift), words in zip(_segment_shifts(bits), packed):
        expected = segment_shape(rows, k, bits, s)
        if tuple(words.shape) != expected or words.dtype != segment_dtype(bits, s):
            raise ValueError(f"packed {s}-bit segment: expected {segment_dtype(bits, s)} {expected}, "
                             f"got {words.dtype} {tuple(words.shape)}")
        # int32: fewer bytes than int64 on the CPU path
        w = _from_row_blocks(words, rows, segment_words(bits, s)).to(torch.int32)
        if segment_words(bits, s) != depth:  # two 4-bit words per byte
            w = torch.stack([w & 15, w >> 4], dim=-1)
        w = w.reshape(rows, kp // TILE_K, 1, depth)
        shifts = (torch.arange(planes, device=w.device, dtype=torch.int32) * s).view(1, 1, -1, 1)
        seg = ((w >> shifts) & ((1 << s) - 1)).to(code.dtype).reshape(rows, kp)
        code |= seg << shift if shift else seg
    if sparse:
        code = _recode_positions(code.to(torch.int64), inverse=True).to(code.dtype)
    return code[:, :k]
