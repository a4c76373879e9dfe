"""lowbit.formats, exhaustively: every code of every format against values computed by hand.

The reference values come from the IEEE-like formula (sign | exponent | mantissa, bias 2^(E-1)-1,
subnormals, no inf/NaN except OCP e4m3fn's 0x7F/0xFF) evaluated in Python floats, and from
torch's own float8 dtypes where those are the same format, never from lowbit itself.
"""

import math

import pytest
import torch

from lowbit import formats

ALL = formats.names()
FLOATS = [n for n in ALL if n.startswith("fp")]
INTS = [n for n in ALL if n.startswith("int")]
E4M3 = "fp8_e4m3"


pytestmark = pytest.mark.usefixtures("one_thread")


def _split(name):
    """(E, M) of 'fpN_eEmM', parsed here (not by lowbit)."""
    e, m = name.split("_e")[1].split("m")
    return int(e), int(m)


def ref_float(code: int, e_bits: int, m_bits: int) -> float:
    """The value of a float code by the textbook formula (Python float, exact for these formats)."""
    sign = (code >> (e_bits + m_bits)) & 1
    e = (code >> m_bits) & ((1 << e_bits) - 1)
    m = code & ((1 << m_bits) - 1)
    bias = 2 ** (e_bits - 1) - 1
    if e_bits == 4 and m_bits == 3 and (code & 0x7F) == 0x7F:
        return math.nan
    if e == 0:
        mag = m * 2.0 ** (1 - bias - m_bits)  # subnormal: 0.m * 2^(1-bias)
    else:
        mag = (1 + m / 2**m_bits) * 2.0 ** (e - bias)
    return -mag if sign else mag


def ref_table(name: str) -> list[float]:
    if name.startswith("int"):
        b = int(name[3:])
        return [float(c - 2 ** (b - 1)) for c in range(2**b)]
    e, m = _split(name)
    return [ref_float(c, e, m) for c in range(2 ** (1 + e + m))]


def nan_codes(name):
    return {0x7F, 0xFF} if name == E4M3 else set()


def neg_zero_code(name):
    return None if name.startswith("int") else 1 << (formats.get(name).bits - 1)


def positive_magnitudes(name):
    """Finite non-negative values in code order (codes 0 .. sign bit - 1), from the reference."""
    t = ref_table(name)
    half = len(t) // 2
    return [v for v in t[:half] if not math.isnan(v)]


# -- names, aliases, errors -----------------------------------------------------------------------

def test_names_cover_the_required_formats():
    required = ["int2", "int3", "int4", "int5", "int6", "int7", "int8", "fp8_e4m3", "fp6_e3m2", "fp6_e2m3",
                "fp5_e2m2", "fp5_e3m1", "fp4_e2m1", "fp3_e1m1", "fp3_e2m0"]
    assert set(required) <= set(ALL)
    assert len(ALL) == len(set(ALL))
    # every eEmM with E >= 1 and 3 <= 1+E+M <= 8
    want_floats = {f"fp{1 + e + m}_e{e}m{m}" for e in range(1, 8) for m in range(0, 8) if 3 <= 1 + e + m <= 8}
    assert set(FLOATS) == want_floats
    assert set(INTS) == {f"int{b}" for b in range(2, 9)}


@pytest.mark.parametrize("name", ALL)
def test_get_name_bits(name):
    f = formats.get(name)
    assert f.name == name
    assert f.bits == (int(name[3:]) if name.startswith("int") else int(name[2]))
    assert f.is_float == name.startswith("fp")


@pytest.mark.parametrize("alias,target", [("fp6", "fp6_e3m2"), ("fp5", "fp5_e2m2"), ("fp4", "fp4_e2m1"),
                                          ("fp8", "fp8_e4m3")])
def test_aliases(alias, target):
    assert formats.get(alias).name == target
    assert formats.get(alias) == formats.get(target)


@pytest.mark.parametrize("name,needle", [
    ("int1", "2 to 8"), ("int9", "2 to 8"), ("int0", "2 to 8"), ("int16", "int2..int8"),
    ("fp9_e4m4", "<= 8"), ("fp9_e5m3", "<= 8"), ("fp10_e5m4", "fpN_eEmM"),
    ("fp8_e4m4", "1 + E + M"), ("fp8_e3m3", "1 + E + M"),
    ("fp4_e0m3", "E >= 1"), ("fp2_e1m0", "<= 8"),
    ("bf16", "int2..int8"), ("float8", "int2..int8"), ("", "int2..int8"), ("fp4_e2m1x", "int2..int8"),
])
def test_unknown_format_names_what_is_allowed(name, needle):
    with pytest.raises(ValueError) as e:
        formats.get(name)
    assert needle in str(e.value)


def test_unknown_format_lists_aliases():
    with pytest.raises(ValueError, match="fp6"):
        formats.get("nf4")


def test_non_string_name():
    with pytest.raises(TypeError):
        formats.get(4)


# -- exhaustive over codes ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_decode_every_code_matches_hand_formula(name):
    f = formats.get(name)
    codes = torch.arange(2**f.bits, dtype=torch.uint8)
    got = f.decode(codes)
    assert got.dtype == torch.float32 and got.shape == codes.shape
    want = torch.tensor(ref_table(name), dtype=torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    # exact: compare in float64 so a float32 rounding in decode would show
    assert torch.equal(got.double()[finite], want[finite])
    # values() is decode of all codes, in code order
    v = f.values()
    assert v.dtype == torch.float32 and v.numel() == 2**f.bits
    assert torch.equal(torch.isnan(v), torch.isnan(got))
    assert torch.equal(v[finite], got[finite])


@pytest.mark.parametrize("name", ALL)
def test_nan_codes(name):
    v = formats.get(name).values()
    nan_at = set(torch.nonzero(torch.isnan(v)).flatten().tolist())
    assert nan_at == nan_codes(name)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_every_code(name):
    f = formats.get(name)
    codes = torch.arange(2**f.bits, dtype=torch.uint8)
    keep = torch.tensor([c not in nan_codes(name) for c in range(2**f.bits)])
    vals = f.decode(codes[keep])
    back = f.encode(vals)
    assert back.dtype == torch.uint8
    # the values round-trip exactly (both zeros included: -0 == +0)
    assert torch.equal(f.decode(back), vals)
    # and so do the codes, except that -0 may come back as +0
    nz = neg_zero_code(name)
    for c, b in zip(codes[keep].tolist(), back.tolist()):
        if c == nz:
            assert b in (0, nz)
        else:
            assert b == c, (name, c, b)


@pytest.mark.parametrize("name", FLOATS)
def test_float_codes_increase_in_magnitude(name):
    f = formats.get(name)
    v = f.values().double()
    half = 2 ** (f.bits - 1)
    pos = v[:half]
    if name == E4M3:
        pos = pos[:-1]
    assert pos[0] == 0
    assert (pos[1:] > pos[:-1]).all(), "positive half must be strictly increasing by code"
    neg = v[half:half + pos.numel()]
    assert torch.equal(neg, -pos), "code | sign bit is the negated value"
    assert torch.signbit(v[half])  # the sign bit of zero is a -0


@pytest.mark.parametrize("name", INTS)
def test_int_decode_is_code_minus_offset(name):
    f = formats.get(name)
    b = f.bits
    codes = torch.arange(2**b, dtype=torch.uint8)
    assert torch.equal(f.decode(codes), torch.arange(2**b, dtype=torch.float32) - 2 ** (b - 1))
    v = f.values()
    assert (v[1:] > v[:-1]).all()
    assert v[0] == -(2 ** (b - 1)) and v[-1] == 2 ** (b - 1) - 1


@pytest.mark.parametrize("name", INTS)
def test_int_encode_rounds_half_even_and_clamps(name):
    f = formats.get(name)
    b = f.bits
    g = torch.Generator().manual_seed(b)
    lim = 2 ** (b - 1)
    x = torch.cat([(torch.rand(2000, generator=g) * 2 - 1) * (lim + 20),
                   torch.arange(-lim - 3, lim + 3, 0.5)])  # all the .5 ties
    got = f.encode(x)
    want = [min(max(round(float(v)), -lim), lim - 1) + lim for v in x.tolist()]  # Python round: half to even
    assert got.tolist() == want


# -- spot values by hand --------------------------------------------------------------------------

SPOT = {
    "fp4_e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "fp3_e1m1": [0, 1, 2, 3],
    "fp3_e2m0": [0, 1, 2, 4],
    "fp5_e2m2": [0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7],
    "fp5_e3m1": [0, .125, .25, .375, .5, .75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24],
    "fp6_e2m3": [i / 8 for i in range(8)] + [1 + i / 8 for i in range(8)] + [2 + i / 4 for i in range(8)]
    + [4 + i / 2 for i in range(8)],
}


@pytest.mark.parametrize("name", sorted(SPOT))
def test_small_formats_positive_values_by_hand(name):
    f = formats.get(name)
    half = 2 ** (f.bits - 1)
    assert f.values()[:half].tolist() == SPOT[name]
    assert f.values()[half:].tolist() == [-v for v in SPOT[name]]


@pytest.mark.parametrize("name,code,value", [
    ("fp8_e4m3", 0x00, 0.0), ("fp8_e4m3", 0x01, 2.0**-9), ("fp8_e4m3", 0x07, 7 * 2.0**-9),
    ("fp8_e4m3", 0x08, 2.0**-6), ("fp8_e4m3", 0x38, 1.0), ("fp8_e4m3", 0xB8, -1.0), ("fp8_e4m3", 0x7E, 448.0),
    ("fp8_e4m3", 0xFE, -448.0), ("fp8_e4m3", 0x40, 2.0), ("fp8_e4m3", 0x3C, 1.5),
    ("fp6_e3m2", 0x01, 2.0**-4), ("fp6_e3m2", 0x04, 0.25), ("fp6_e3m2", 0x0C, 1.0), ("fp6_e3m2", 0x1F, 28.0),
    ("fp6_e3m2", 0x3F, -28.0), ("fp6_e3m2", 0x0E, 1.5),
    ("fp8_e5m2", 0x3C, 1.0), ("fp8_e5m2", 0x7F, 1.75 * 2.0**16), ("fp8_e5m2", 0x01, 2.0**-16),
    ("fp8_e1m6", 0x40, 2.0), ("fp8_e1m6", 0x7F, 2 * (1 + 63 / 64)), ("fp8_e1m6", 0x01, 2 / 64),
    ("fp8_e7m0", 0x3F, 1.0), ("fp8_e7m0", 0x7F, 2.0**64), ("fp8_e7m0", 0x01, 2.0**-62), ("fp8_e7m0", 0x00, 0.0),
    ("int4", 0, -8.0), ("int4", 8, 0.0), ("int4", 15, 7.0), ("int8", 0, -128.0), ("int8", 255, 127.0),
    ("int2", 0, -2.0), ("int2", 3, 1.0), ("int3", 5, 1.0),
])
def test_spot_values(name, code, value):
    assert formats.get(name).decode(torch.tensor([code], dtype=torch.uint8)).item() == value


@pytest.mark.parametrize("name,maximum", [("fp8_e4m3", 448), ("fp6_e3m2", 28), ("fp6_e2m3", 7.5), ("fp5_e2m2", 7),
                                          ("fp5_e3m1", 24), ("fp4_e2m1", 6), ("fp3_e1m1", 3), ("fp3_e2m0", 4),
                                          ("fp8_e5m2", 57344 * 2)])
def test_max_values(name, maximum):
    f = formats.get(name)
    v = f.values()
    assert v[~torch.isnan(v)].max().item() == maximum
    assert v[~torch.isnan(v)].min().item() == -maximum
    assert f.max_value == maximum


@pytest.mark.parametrize("name", [n for n in FLOATS if n != E4M3])
def test_other_float_formats_every_code_finite(name):
    assert torch.isfinite(formats.get(name).values()).all()


# -- against torch's float8 dtypes (an independent implementation) --------------------------------

def test_e4m3_decode_matches_torch_float8_e4m3fn():
    codes = torch.arange(256, dtype=torch.uint8)
    torch_vals = codes.view(torch.float8_e4m3fn).float()
    ours = formats.get(E4M3).decode(codes)
    assert torch.equal(torch.isnan(ours), torch.isnan(torch_vals))
    ok = ~torch.isnan(ours)
    assert torch.equal(ours[ok], torch_vals[ok])


def test_e4m3_encode_matches_torch_rounding():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20000, generator=g) * 50, torch.randn(20000, generator=g) * 2.0**-7,
                   (torch.rand(20000, generator=g) * 2 - 1) * 448])
    ours = formats.get(E4M3).encode(x)
    theirs = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ours, theirs)


def test_e5m2_finite_codes_match_torch_float8_e5m2():
    # lowbit's e5m2 has no inf/NaN; its other codes are IEEE e5m2's.
    codes = torch.arange(256, dtype=torch.uint8)
    ieee = codes.view(torch.float8_e5m2).float()
    ours = formats.get("fp8_e5m2").decode(codes)
    finite = torch.isfinite(ieee)
    assert finite.sum() == 256 - 4 * 2 - 0  # 2 inf, 6 NaN
    assert torch.equal(ours[finite], ieee[finite])
    assert torch.isfinite(ours).all()


# -- e4m3 NaN and saturation ----------------------------------------------------------------------

def test_e4m3_encode_never_produces_nan_codes_and_saturates():
    f = formats.get(E4M3)
    x = torch.cat([torch.linspace(-2000, 2000, 64001), torch.tensor([448.0, 449.0, 464.0, 479.0, 480.0, 1e30,
                                                                       float("inf"), -float("inf"), -464.0])])
    c = f.encode(x)
    assert not ((c == 0x7F) | (c == 0xFF)).any()
    big = x.abs() >= 448
    assert (c[big & (x > 0)] == 0x7E).all()
    assert (c[big & (x < 0)] == 0xFE).all()
    assert torch.isfinite(f.decode(c)).all()


# -- rounding: ties to even, just off the ties, saturation ----------------------------------------

def _ties(name):
    """(midpoint, lower code, upper code) for every pair of neighbouring positive finite values."""
    mags = positive_magnitudes(name)
    return [((a + b) / 2, i, i + 1) for i, (a, b) in enumerate(zip(mags, mags[1:]))]


@pytest.mark.parametrize("name", FLOATS)
def test_float_ties_go_to_the_even_code(name):
    f = formats.get(name)
    ties = _ties(name)
    mids = torch.tensor([t[0] for t in ties], dtype=torch.float32)
    assert torch.equal(mids.double(), torch.tensor([t[0] for t in ties], dtype=torch.float64)), "midpoints exact"
    even = torch.tensor([lo if lo % 2 == 0 else hi for _, lo, hi in ties], dtype=torch.uint8)
    sign = 1 << (f.bits - 1)
    assert torch.equal(f.encode(mids), even)
    assert torch.equal(f.encode(-mids), even | sign)
    # just below a midpoint rounds down, just above rounds up, ties or not
    lo = torch.tensor([t[1] for t in ties], dtype=torch.uint8)
    hi = torch.tensor([t[2] for t in ties], dtype=torch.uint8)
    below = torch.nextafter(mids, torch.zeros_like(mids))
    above = torch.nextafter(mids, torch.full_like(mids, math.inf))
    assert torch.equal(f.encode(below), lo)
    assert torch.equal(f.encode(above), hi)
    assert torch.equal(f.encode(-above), hi | sign)


@pytest.mark.parametrize("name", ALL)
def test_saturation_beyond_max(name):
    f = formats.get(name)
    mags = positive_magnitudes(name) if f.is_float else None
    if f.is_float:
        top = mags[-1]
        gap = mags[-1] - mags[-2]
        top_code = len(mags) - 1
        sign = 1 << (f.bits - 1)
        x = torch.tensor([top, top + gap / 2, top + gap, top * 1.5, top * 1e6, math.inf], dtype=torch.float32)
        assert f.encode(x).tolist() == [top_code] * x.numel()
        assert f.encode(-x).tolist() == [top_code | sign] * x.numel()
    else:
        lim = 2 ** (f.bits - 1)
        x = torch.tensor([lim - 1, lim - 0.5, lim, lim + 7, 1e9, math.inf])
        assert f.encode(x).tolist() == [2 * lim - 1] * x.numel()
        assert f.encode(-x - 1).tolist() == [0] * x.numel()


@pytest.mark.parametrize("name", ALL)
def test_encode_is_nearest_value_brute_force(name):
    """Random inputs: decode(encode(x)) is a value nearest to x (ties to the even code)."""
    f = formats.get(name)
    table = torch.tensor(ref_table(name), dtype=torch.float64)
    finite = ~torch.isnan(table)
    nz = neg_zero_code(name)
    if nz is not None:
        finite[nz] = False  # -0 is the same value as +0: not a separate candidate
    fin_codes = torch.arange(table.numel())[finite]
    fin_vals = table[finite]
    top = fin_vals.abs().max().item()
    g = torch.Generator().manual_seed(f.bits * 17 + len(name))
    x = torch.cat([(torch.rand(3000, generator=g) * 2 - 1) * top * 1.2,
                   torch.randn(3000, generator=g) * top / 16]).to(torch.float32)
    codes = f.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    dist = (x.double()[:, None] - fin_vals[None, :]).abs()
    best = dist.min(dim=1).values
    got = table[codes.long()]
    assert torch.equal((x.double() - got).abs(), best)
    # among equally near values, the even code (only matters at exact ties)
    tied = (dist == best[:, None]).sum(1) > 1
    for i in torch.nonzero(tied).flatten().tolist():
        cands = fin_codes[dist[i] == best[i]].tolist()
        even = [c for c in cands if c % 2 == 0]
        got_code = 0 if int(codes[i]) == nz else int(codes[i])
        assert got_code in even, (name, float(x[i]), cands, int(codes[i]))


@pytest.mark.parametrize("name", FLOATS)
def test_tiny_values_round_to_zero_or_min_subnormal(name):
    f = formats.get(name)
    mags = positive_magnitudes(name)
    m1 = mags[1]
    x = torch.tensor([m1 / 4, m1 / 2, m1 * 0.75, m1], dtype=torch.float32)
    assert f.decode(f.encode(x)).tolist() == [0.0, 0.0, m1, m1]  # m1/2 is a tie: to code 0


def test_encode_keeps_shape_and_accepts_half_dtypes():
    f = formats.get("fp4_e2m1")
    x = torch.tensor([[0.26, -1.2, 5.0], [7.0, 0.0, 2.5]])
    # 5.0 ties between 4 (code 6) and 6 (code 7): code 6; 2.5 ties between 2 (code 4) and 3 (code 5): code 4
    want = torch.tensor([[1, 0x8 | 2, 6], [7, 0, 4]], dtype=torch.uint8)
    assert torch.equal(f.encode(x), want)
    assert torch.equal(f.encode(x.half()), want)
    assert torch.equal(f.encode(x.bfloat16().float()), f.encode(x.bfloat16()))
    assert f.decode(want).shape == (2, 3)


# -- input errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["int4", "fp4_e2m1", "fp8_e4m3", "int8"])
def test_encode_nan_raises(name):
    with pytest.raises(ValueError, match="NaN"):
        formats.get(name).encode(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("name", ["int4", "fp6_e3m2"])
@pytest.mark.parametrize("bad", [torch.tensor([1, 2]), torch.tensor([True]), [1.0, 2.0], 3.0, None],
                         ids=["int64", "bool", "list", "float", "None"])
def test_encode_non_float_raises_type_error(name, bad):
    with pytest.raises(TypeError, match="floating-point"):
        formats.get(name).encode(bad)


@pytest.mark.parametrize("name", ["int4", "fp4_e2m1", "fp6_e2m3"])
def test_decode_rejects_bad_codes(name):
    f = formats.get(name)
    with pytest.raises(TypeError):
        f.decode(torch.tensor([1.0]))
    with pytest.raises(TypeError):
        f.decode([1, 2])
    with pytest.raises(ValueError, match="out of range"):
        f.decode(torch.tensor([2**f.bits], dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        f.decode(torch.tensor([-1], dtype=torch.int32))
