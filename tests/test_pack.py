"""lowbit.pack: the storage layout (tiled-planes-v4) and its exact inverse.

Expected words are derived here by hand from the layout's description, not from pack_codes:
K is cut into tiles of 128; a B-bit code is split into segments of 8/4/2/1 bits (most
significant first); every segment stores D = 32 words per row and tile (128 for plain bytes),
word i holding the segment bits of k = 128 t + D j + i at bits s*j .. s*j+s-1; a 1-bit segment's
4-bit words are stored two to a byte (word 2c in the low nibble of byte c).
"""

import math

import pytest
import torch

from lowbit import pack

BITS = [2, 3, 4, 5, 6, 7, 8, 10]  # 10: 2:4 sparse codes of 8-bit formats (value and position)
KS = [1, 100, 127, 128, 129, 576, 1000]


pytestmark = pytest.mark.usefixtures("one_thread")

# Per bit width, by hand: (segment width, stored word dtype, stored words per row and tile) of each
# segment (a 1-bit segment: 16 bytes of two 4-bit words).
LAYOUT_BY_HAND = {
    10: [(4, torch.int16, 32), (4, torch.int16, 32), (2, torch.uint8, 32)],
    8: [(8, torch.uint8, 128)],
    7: [(4, torch.int16, 32), (2, torch.uint8, 32), (1, torch.uint8, 16)],
    6: [(4, torch.int16, 32), (2, torch.uint8, 32)],
    5: [(4, torch.int16, 32), (1, torch.uint8, 16)],
    4: [(4, torch.int16, 32)],
    3: [(2, torch.uint8, 32), (1, torch.uint8, 16)],
    2: [(2, torch.uint8, 32)],
}


def random_codes(n, k, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int64).to(pack.code_dtype(bits))


def word_at(t: torch.Tensor, row: int, tile: int, i: int, depth: int) -> int:
    """Word ``i`` of ``tile`` of ``row``, by the layout's definition: row blocks of 16 rows, tiles
    one after the other inside a block, rows of a tile one after the other."""
    return int(t[row // 16, (tile * 16 + row % 16) * depth + i])


def row_words(t: torch.Tensor, n: int, depth: int) -> torch.Tensor:
    """``[n, tiles * depth]``: each row's words, tile after tile."""
    tiles = t.shape[1] // (16 * depth)
    return torch.tensor([[word_at(t, r, tile, i, depth) for tile in range(tiles) for i in range(depth)]
                         for r in range(n)], dtype=t.dtype)


def unsigned(word: int, width: int) -> int:
    return word & ((1 << width) - 1)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_segments_by_hand(bits):
    want = LAYOUT_BY_HAND[bits]
    assert pack.SEGMENTS[bits] == tuple(s for s, _, _ in want)
    assert sum(pack.SEGMENTS[bits]) == bits
    for s, dt, words in want:
        assert pack.segment_dtype(bits, s) == dt
        assert pack.segment_words(bits, s) == words
        assert pack.plane_depth(bits) == (128 if bits == 8 else 32)
        # no waste: a row's tile of a segment is exactly 128 * s bits
        assert words * torch.iinfo(dt).bits == 128 * s
        for n, k in [(1, 1), (3, 128), (5, 129), (2, 1000), (16, 128), (17, 128)]:
            assert pack.segment_shape(n, k, bits, s) == (math.ceil(n / 16), math.ceil(k / 128) * 16 * words)


@pytest.mark.parametrize("k", KS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_round_trip(bits, k):
    n = 1 + (bits * 7 + k) % 9
    codes = random_codes(n, k, bits, seed=bits * 1000 + k)
    packed = pack.pack_codes(codes, bits)
    want = LAYOUT_BY_HAND[bits]
    assert isinstance(packed, tuple) and len(packed) == len(want)
    tiles = math.ceil(k / 128)
    for t, (s, dt, words) in zip(packed, want):
        blocks = math.ceil(n / 16)
        assert t.dtype == dt and tuple(t.shape) == (blocks, tiles * 16 * words) == pack.segment_shape(n, k, bits, s)
        assert t.is_contiguous()
        assert not row_words(t, 16 * blocks, words)[n:].any()  # rows past n are padding, code 0
    total_bytes = sum(t.numel() * t.element_size() for t in packed)
    assert total_bytes == math.ceil(n / 16) * 16 * tiles * 128 * bits // 8  # exactly B bits per (padded) weight
    out = pack.unpack_codes(packed, bits, k, rows=n)
    assert out.dtype == pack.code_dtype(bits) and out.shape == (n, k)
    assert torch.equal(out, codes)
    # the padding of the last tile is code 0
    full = pack.unpack_codes(packed, bits, tiles * 128, rows=n)
    assert torch.equal(full[:, :k], codes) and not full[:, k:].any()


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("fill", ["zeros", "max"])
def test_round_trip_extremes(bits, fill):
    """All-ones codes set the sign bit of the int16/int32 words."""
    codes = torch.full((3, 300), 0 if fill == "zeros" else (1 << bits) - 1, dtype=pack.code_dtype(bits))
    packed = pack.pack_codes(codes, bits)
    assert torch.equal(pack.unpack_codes(packed, bits, 300, rows=3), codes)
    if fill == "max":
        for (s, dt, depth), t in zip(LAYOUT_BY_HAND[bits], packed):
            if dt != torch.uint8:
                assert (row_words(t, 3, depth)[:, : 2 * depth] == -1).all()  # whole tiles: every bit set


def test_int4_layout_spot_check():
    """int4: int16 word i of tile t of row n holds code(k=128t+32j+i) at bits 4j..4j+3, j = 0..3."""
    n, k = 19, 576  # two row blocks (the second padded); 4.5 tiles: planes 2 and 3 of the last tile are padding
    codes = random_codes(n, k, 4, seed=42)
    (p,) = pack.pack_codes(codes, 4)
    assert p.dtype == torch.int16 and p.shape == (2, 5 * 16 * 32)
    c = codes.tolist()
    for row in range(n):
        for t in range(5):
            for i in range(32):
                want = sum((c[row][kk] if (kk := 128 * t + 32 * j + i) < k else 0) << (4 * j) for j in range(4))
                assert unsigned(word_at(p, row, t, i, 32), 16) == want, (row, t, i)
    # one by hand: row 17 (block 1, row 1), tile 2, word 5 holds k = 261, 293, 325, 357
    word = unsigned(int(p[1, (2 * 16 + 1) * 32 + 5]), 16)
    assert word == c[17][261] | c[17][293] << 4 | c[17][325] << 8 | c[17][357] << 12


def test_int8_layout_is_plain_bytes():
    codes = random_codes(2, 300, 8, seed=1)
    (p,) = pack.pack_codes(codes, 8)
    rows = row_words(p, 2, 128)
    assert torch.equal(rows[:, :300], codes) and not rows[:, 300:].any()


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_layout_every_word_by_hand(bits):
    """Every word of every segment, from the layout's definition in plain Python."""
    n, k = 18, 200  # two row blocks, the second with 2 of its 16 rows
    codes = random_codes(n, k, bits, seed=bits)
    packed = pack.pack_codes(codes, bits)
    c = codes.tolist()
    shift = bits
    depth = 128 if bits == 8 else 32
    planes = 128 // depth
    for (s, dt, words), t in zip(LAYOUT_BY_HAND[bits], packed):
        shift -= s  # this segment holds code bits shift .. shift+s-1
        width = torch.iinfo(dt).bits

        def word(row, tile, i):  # segment bits of k = 128 tile + depth j + i at bits s*j
            want = 0
            for j in range(planes):
                kk = 128 * tile + depth * j + i
                code = c[row][kk] if kk < k else 0
                want |= ((code >> shift) & ((1 << s) - 1)) << (s * j)
            return want

        for row in range(n):
            for tile in range(2):
                for i in range(words):
                    if words == depth:
                        want = word(row, tile, i)
                    else:  # two 4-bit words per byte
                        want = word(row, tile, 2 * i) | word(row, tile, 2 * i + 1) << 4
                    got = unsigned(word_at(t, row, tile, i, words), width)
                    assert got == want, (bits, s, row, tile, i)
    assert shift == 0


def test_padded_k():
    assert [pack.padded_k(k) for k in (1, 127, 128, 129, 576, 1000)] == [128, 128, 128, 256, 640, 1024]
    assert pack.TILE_K == 128 and pack.LAYOUT == "tiled-planes-v4"


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("codes,bits,msg", [
    (torch.zeros(2, 8, dtype=torch.int16), 4, "uint8"),
    (torch.zeros(2, 8, dtype=torch.float32), 4, "uint8"),
    (torch.zeros(8, dtype=torch.uint8), 4, r"\[N, K\]"),
    (torch.zeros(2, 2, 8, dtype=torch.uint8), 4, r"\[N, K\]"),
    (torch.zeros(2, 8, dtype=torch.uint8), 10, "int16"),
    (torch.zeros(2, 8, dtype=torch.uint8), 1, "supports"),
    (torch.zeros(2, 8, dtype=torch.uint8), 9, "supports"),
], ids=["int16", "float", "1-D", "3-D", "uint8-for-10-bits", "bits1", "bits9"])
def test_pack_rejects(codes, bits, msg):
    with pytest.raises(ValueError, match=msg):
        pack.pack_codes(codes, bits)


def test_pack_sparse_rejects_positions_that_are_not_ascending_pairs():
    ok = torch.tensor([[0, 1, 1 << 2 | 2, 3]], dtype=torch.uint8)  # groups (0, 1) and (2, 3)
    pack.pack_codes(ok, 6, sparse=True)
    for bad in ([[1, 0, 2, 3]], [[2, 2, 0, 1]], [[3, 0, 0, 1]]):
        with pytest.raises(ValueError, match="ascend"):
            pack.pack_codes(torch.tensor(bad, dtype=torch.uint8), 6, sparse=True)
    with pytest.raises(ValueError, match="two per group"):
        pack.pack_codes(torch.tensor([[0, 1, 2]], dtype=torch.uint8), 6, sparse=True)


def test_pack_rejects_codes_out_of_range():
    """A code of more than ``bits`` bits cannot be stored: it must be an error, not silently truncated."""
    for bits in [2, 3, 4, 5, 6, 7, 10]:
        codes = torch.zeros(2, 10, dtype=pack.code_dtype(bits))
        codes[1, 3] = 1 << bits
        with pytest.raises(ValueError, match="range"):
            pack.pack_codes(codes, bits)


def _wrong_packed():
    n, k = 4, 300
    p7 = pack.pack_codes(random_codes(n, k, 7, 0), 7)
    p4 = pack.pack_codes(random_codes(n, k, 4, 0), 4)
    return {
        "int7-missing-segment": (p7[:2], 7, k, "3 packed segments"),
        "int7-extra-segment": (p7 + p7[:1], 7, k, "3 packed segments"),
        "int7-seg0-dtype": ((p7[0].to(torch.int32), p7[1], p7[2]), 7, k, "4-bit segment"),
        "int7-seg1-shape": ((p7[0], p7[1][:, :-1], p7[2]), 7, k, "2-bit segment"),
        "int7-seg2-rows": ((p7[0], p7[1], p7[2][:-1]), 7, k, "1-bit segment"),
        "int7-k-too-big": (p7, 7, 400, "expected"),
        "int7-k-too-small": (p7, 7, 100, "expected"),
        "int4-as-int8": (p4, 8, k, "8-bit segment"),
        "int4-as-int2": (p4, 2, k, "2-bit segment"),
        "int4-as-int6": (p4, 6, k, "2 packed segments"),
        "int4-int8-words": ((p4[0].view(torch.int8),), 4, k, "4-bit segment"),
        "int4-transposed": ((p4[0].T.contiguous(),), 4, k, "4-bit segment"),
        "int4-3d": ((p4[0].unsqueeze(0),), 4, k, "4-bit segment"),
        "bits9": (p4, 9, k, "9-bit"),
        "bits1": (p4, 1, k, "1-bit"),
    }


WRONG = ["int7-missing-segment", "int7-extra-segment", "int7-seg0-dtype", "int7-seg1-shape", "int7-seg2-rows",
         "int7-k-too-big", "int7-k-too-small", "int4-as-int8", "int4-as-int2", "int4-as-int6", "int4-int8-words",
         "int4-transposed", "int4-3d", "bits9", "bits1"]


@pytest.mark.parametrize("case", WRONG)
def test_unpack_rejects(case):
    cases = _wrong_packed()
    assert sorted(cases) == sorted(WRONG)
    packed, bits, k, msg = cases[case]
    with pytest.raises(ValueError, match=msg):
        pack.unpack_codes(packed, bits, k, rows=4)
