"""Storage layout of low-bit codes, as the kernels read it, and its exact inverse.

Layout ``tiled-planes-v1``
--------------------------
A ``B``-bit code is split into *segments* of 8, 4, 2 and 1 bits, most significant first
(``SEGMENTS[6] == (4, 2)``: bits 5..2, then bits 1..0), so every load stays aligned and no
code straddles a word (the TC-FPx idea), and 3/5/6/7-bit codes take exactly B bits.

K is cut into tiles of ``TILE_K = 128`` input weights (the last tile padded with code 0).
A segment of ``s <= 4`` bits stores, for each row ``n`` and tile ``t``, ``PLANE = 16`` words of
``8*s`` bits (int32 for 4 bits, int16 for 2, int8 for 1). Word ``i`` of the tile holds the
codes of ``k = 128*t + i + 16*j`` at bits ``s*j .. s*j+s-1`` for ``j = 0..7``. So one shift and
mask of the word tile ``[rows, 16]`` gives *plane* ``j``: the codes of 16 consecutive ``k``,
which is directly a 16-deep operand of the matrix instruction, with no reshape in the kernel.
An 8-bit segment is stored plainly, ``[N, K_padded]`` uint8 (one plane 128 deep).

Each segment is a row-major tensor ``[N, K_padded * s / 8]`` in bytes, so a 128-deep tile of a
row is 64 contiguous bytes for 4 bits: 16-byte vector loads, every byte used.
"""

from __future__ import annotations

import torch

__all__ = ["TILE_K", "PLANE", "LAYOUT", "SEGMENTS", "padded_k", "pack_codes", "unpack_codes", "segment_dtype", "segment_shape"]

LAYOUT = "tiled-planes-v1"
TILE_K = 128
PLANE = 16
_CODES_PER_WORD = TILE_K // PLANE

SEGMENTS = {8: (8,), 7: (4, 2, 1), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,)}
_WORD_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.uint8}


def padded_k(k: int) -> int:
    return -(-k // TILE_K) * TILE_K


def segment_dtype(seg_bits: int) -> torch.dtype:
    return _WORD_DTYPES[seg_bits]


def segment_shape(n: int, k: int, seg_bits: int) -> tuple[int, int]:
    """Shape of the packed tensor of one ``seg_bits``-wide segment for a ``[n, k]`` weight."""
    kp = padded_k(k)
    return (n, kp) if seg_bits == 8 else (n, kp // TILE_K * PLANE)


def _segment_shifts(bits: int) -> list[tuple[int, int]]:
    """(width, right shift of the code) per segment, most significant first."""
    out, shift = [], bits
    for s in SEGMENTS[bits]:
        shift -= s
        out.append((s, shift))
    return out


def pack_codes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """``codes [N, K]`` (uint8, each < 2**bits) -> one tensor per segment, in kernel layout."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack_codes expects uint8 codes of shape [N, K], got {codes.dtype} {tuple(codes.shape)}")
    if bits not in SEGMENTS:
        raise ValueError(f"pack_codes supports 2 to 8 bits, got {bits}")
    n, k = codes.shape
    kp = padded_k(k)
    c = torch.zeros(n, kp, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes
    out = []
    for s, shift in _segment_shifts(bits):
        seg = (c >> shift) & ((1 << s) - 1)
        if s == 8:
            out.append(seg.to(torch.uint8))
            continue
        # [N, tiles, j, i] with k = 128 t + 16 j + i; word i holds plane j at bits s*j.
        seg = seg.view(n, kp // TILE_K, _CODES_PER_WORD, PLANE)
        weights = (torch.arange(_CODES_PER_WORD, device=codes.device, dtype=torch.int64) * s).view(1, 1, -1, 1)
        words = (seg << weights).sum(dim=2)  # disjoint bit fields: sum == or
        width = 8 * s
        words = torch.where(words >= (1 << (width - 1)), words - (1 << width), words)  # two's complement
        out.append(words.reshape(n, kp // TILE_K * PLANE).to(_WORD_DTYPES[s]))
    return tuple(out)


def unpack_codes(packed: tuple[torch.Tensor, ...], bits: int, k: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_codes`: ``[N, K]`` uint8 codes."""
    if bits not in SEGMENTS or len(packed) != len(SEGMENTS[bits]):
        raise ValueError(f"{bits}-bit codes need {len(SEGMENTS.get(bits, ()))} packed segments, got {len(packed)}")
    n = packed[0].shape[0]
    kp = padded_k(k)
    code = torch.zeros(n, kp, dtype=torch.int64, device=packed[0].device)
    for (s, shift), words in zip(_segment_shifts(bits), packed):
        expected = segment_shape(n, k, s)
        if tuple(words.shape) != expected or words.dtype != _WORD_DTYPES[s]:
            raise ValueError(f"packed {s}-bit segment: expected {_WORD_DTYPES[s]} {expected}, "
                             f"got {words.dtype} {tuple(words.shape)}")
        w = words.to(torch.int64)
        if s == 8:
            seg = w
        else:
            w = (w & ((1 << (8 * s)) - 1)).view(n, kp // TILE_K, 1, PLANE)
            shifts = (torch.arange(_CODES_PER_WORD, device=w.device, dtype=torch.int64) * s).view(1, 1, -1, 1)
            seg = ((w >> shifts) & ((1 << s) - 1)).reshape(n, kp)
        code |= seg << shift
    return code[:, :k].to(torch.uint8)
