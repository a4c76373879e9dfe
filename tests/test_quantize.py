"""lowbit.quantize (RTN) and lowbit.QuantizedWeight.

Every quantized weight is checked against what the test computes on its own:

* ``dequantize()`` equals, bit for bit, the decode table of the format (``formats.values()``,
  itself tested exhaustively in test_formats.py) times the scales expanded per group (minus the
  zero points for asymmetric schemes);
* every code is a nearest grid point of ``w / scale`` (round to nearest);
* the scales cover each group's range without wasting it (MX: the OCP shared-exponent rule);
* the last, shorter group and every other group are quantized on their own columns only.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import QuantizedWeight, Scheme, formats
from lowbit import pack as lpack

# Every bit width with every granularity; sym/asym alternate so that each (granularity, symmetry) pair
# appears for several bit widths, and per-channel comes both ways for every width.
_A, _B = ("g16", "g64", "g256", "channel"), ("g32", "g128", "channel")
INT_SCHEMES = [f"int{b}-{g}" for b in range(2, 9) for g in (_A if b % 2 == 0 else _B)] + \
              [f"int{b}-{g}-asym" for b in range(2, 9) for g in (_B if b % 2 == 0 else _A)]
FLOAT_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp5_e3m1", "fp4_e2m1", "fp3_e1m1",
                 "fp3_e2m0"]
FLOAT_SCHEMES = [f"{f}-{g}" for f in FLOAT_FORMATS for g in ("channel", "g32", "g128", "g32-mx")]
SCHEMES = INT_SCHEMES + FLOAT_SCHEMES
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


pytestmark = pytest.mark.usefixtures("one_thread")


# -- independent references -----------------------------------------------------------------------

def group_size_of(scheme: Scheme, k: int) -> int:
    return k if scheme.group_size == -1 else scheme.group_size


def expand(t_gn: torch.Tensor, scheme: Scheme, k: int) -> torch.Tensor:
    """``[G, N]`` (the stored layout) -> ``[N, k]``, column c taking group c // g."""
    return t_gn[torch.arange(k) // group_size_of(scheme, k)].T


def scale_values(qw: QuantizedWeight) -> torch.Tensor:
    """float32 ``[G, N]``; E8M0 exponents decoded here as 2^(e-127)."""
    if qw.scheme.mx:
        return (2.0 ** (qw.scales.to(torch.float64) - 127)).to(torch.float32)
    return qw.scales.to(torch.float32)


def reference_dequant(qw: QuantizedWeight) -> torch.Tensor:
    scheme = qw.scheme
    n, k = qw.shape
    codes = qw.codes().long()
    s = expand(scale_values(qw), scheme, k)
    if qw.zeros is not None:
        val = codes.to(torch.float32) - expand(qw.zeros, scheme, k).to(torch.float32)
    else:
        val = formats.get(scheme.format).values()[codes]
    return val * s


def group_view(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``[N, k]`` -> ``[N, G, g]``, the last group padded with zeros (harmless for amax, min<=0, max>=0)."""
    n, k = x.shape
    g = group_size_of(scheme, k)
    groups = -(-k // g)
    return F.pad(x, (0, groups * g - k)).view(n, groups, g)


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def check_quantized(w: torch.Tensor, scheme_text: str, qw: QuantizedWeight, clipped: bool = False) -> None:
    scheme = Scheme.parse(scheme_text)
    fmt = formats.get(scheme.format)
    n, k = w.shape
    g = group_size_of(scheme, k)
    groups = -(-k // g)
    where = f"{scheme_text} {DT[w.dtype]} {tuple(w.shape)}"

    # structure
    assert qw.shape == (n, k) and qw.dtype == w.dtype and qw.scheme == scheme, where
    want_sd = torch.uint8 if scheme.mx else torch.float32 if (scheme.per_channel or w.dtype == torch.float32) \
        else w.dtype
    assert qw.scales.dtype == want_sd and tuple(qw.scales.shape) == (groups, n), where
    if scheme.symmetric:
        assert qw.zeros is None, where
    else:
        assert qw.zeros.dtype == torch.uint8 and tuple(qw.zeros.shape) == (groups, n), where
        assert int(qw.zeros.max()) <= (1 << fmt.bits) - 1
    assert qw.perm is None

    # codes in range (no e4m3 NaN code)
    codes = qw.codes()
    assert codes.dtype == torch.uint8 and codes.shape == (n, k), where
    assert int(codes.max()) < (1 << fmt.bits), where
    if scheme.format == "fp8_e4m3":
        assert not ((codes == 0x7F) | (codes == 0xFF)).any(), where

    # dequantize == reference, bit for bit, in float32 and in the weight's dtype
    ref = reference_dequant(qw)
    d32 = qw.dequantize(torch.float32)
    assert d32.dtype == torch.float32 and d32.shape == (n, k)
    assert torch.equal(d32, ref), where
    d = qw.dequantize()
    assert d.dtype == w.dtype and torch.equal(d, ref.to(w.dtype)), where
    assert torch.isfinite(d32).all(), where

    # scales positive and finite
    sv = scale_values(qw)
    assert torch.isfinite(sv).all() and (sv > 0).all(), where

    # zero weights stay exactly zero
    w32 = w.to(torch.float32)
    assert (d32[w32 == 0] == 0).all(), where

    # every code is a nearest grid point of w / scale
    s_exp = expand(sv, scheme, k)
    q = (w32 / s_exp).double()
    if fmt.is_float:
        table = fmt.values().double()
        grid = torch.unique(table[~torch.isnan(table)])  # sorted
        i = torch.searchsorted(grid, q).clamp(1, grid.numel() - 1)
        best = torch.minimum((q - grid[i - 1]).abs(), (q - grid[i]).abs())
        chosen = (q - table[codes.long()]).abs()
    else:
        maxq = (1 << fmt.bits) - 1
        z = float(1 << (fmt.bits - 1)) if qw.zeros is None else expand(qw.zeros, scheme, k).double()
        t = q + z
        best = (t - t.round().clamp(0, maxq)).abs()
        chosen = (t - codes.double()).abs()
    bad = chosen > best
    assert not bad.any(), f"{where}: {int(bad.sum())} codes are not a nearest grid point"

    if clipped:
        return
    # scales cover each group's range and do not waste it
    wg = group_view(w32.double(), scheme)
    amax = wg.abs().amax(-1)  # [N, G]
    sg = sv.T.double()  # [N, G]
    nz = amax > 0
    # groups whose ideal scale lies below the scale dtype's smallest normal (wide float formats or tiny
    # ranges in fp16) are only checked for coverage here; see test_small_fp16_groups_keep_their_resolution
    ideal = amax / (fmt.max_value if fmt.is_float else (1 << fmt.bits))
    normal = nz & (ideal >= (torch.finfo(want_sd).tiny if want_sd.is_floating_point else 0))
    u = unit_roundoff(torch.float32 if scheme.mx else want_sd)
    if scheme.mx:
        emax = math.floor(math.log2(fmt.max_value))
        ratio = (amax / sg)[nz]
        assert ((ratio >= 2.0**emax) & (ratio < 2.0 ** (emax + 1))).all(), where  # OCP MX shared exponent
        e = torch.log2(sg)
        assert torch.equal(e, e.round()), where
    elif fmt.is_float:
        ratio = amax / (sg * fmt.max_value)
        assert (ratio[nz] <= 1 + 2 * u).all(), f"{where}: values beyond the grid, amax/(scale*max) {ratio[nz]}"
        assert (ratio[normal] >= 1 - 2 * u).all(), f"{where}: grid wider than the group, {ratio[normal]}"
    else:
        maxq = (1 << fmt.bits) - 1
        err = (w32.double() - d32.double()).abs()
        bound = s_exp.double() * (0.5 + 2 * (maxq + 1) * u)
        assert (err <= bound).all(), f"{where}: error above half a step"
        span = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) if not scheme.symmetric else 2 * amax
        assert ((span / sg)[normal] >= (maxq - 1) * (1 - 2 * u)).all(), f"{where}: grid wider than the group needs"


def rand_weight(shape, dtype, seed, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if heavy:
        w = w * torch.exp(torch.randn(shape, generator=g))
    return w.to(dtype)


def special_weight(dtype):
    """Rows that break naive scale formulas: zeros, constants, one spike, alternating, small ternary."""
    k = 150
    rows = [torch.zeros(k), torch.full((k,), 0.37), torch.full((k,), -2.5), F.one_hot(torch.tensor(77), k).float(),
            torch.tensor([1.0, -1.0]).repeat(k // 2), torch.full((k,), 1e-2) * torch.arange(k).remainder(3).sub(1)]
    w = torch.stack(rows)
    w[3, :40] = 0.0  # a spike in group 1 only, other groups zero
    return w.to(dtype)


# -- the main property test over every scheme kind ------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_rtn_matches_reference(scheme):
    idx = SCHEMES.index(scheme)
    g = torch.Generator().manual_seed(idx)
    rand_shape = (int(torch.randint(1, 24, (), generator=g)), int(torch.randint(1, 700, (), generator=g)))
    # the large odd shapes for a third of the schemes each (the rest get a medium one), dtypes rotating
    big = [(200, 576), (64, 1000), (8, 576)][idx % 3]
    cases = [((1, 1), DTYPES[idx % 3]), ((3, 17), DTYPES[(idx + 1) % 3]), (rand_shape, DTYPES[(idx + 2) % 3]),
             (big, DTYPES[(idx + idx // 3) % 3])]
    for i, (shape, dt) in enumerate(cases):
        w = rand_weight(shape, dt, seed=1000 * idx + i, heavy=i % 2 == 1)
        check_quantized(w, scheme, lowbit.quantize(w, scheme))
    w = special_weight(DTYPES[idx % 3])
    check_quantized(w, scheme, lowbit.quantize(w, scheme))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if "channel" not in s and s.startswith(("int4", "int3", "fp"))])
def test_groups_are_quantized_independently(scheme):
    """Group j (the last one shorter) gets the codes and scales of quantizing its columns alone."""
    k = 300
    w = rand_weight((5, k), torch.float16, seed=7, heavy=True)
    qw = lowbit.quantize(w, scheme)
    g = qw.scheme.group_size
    codes = qw.codes()
    for j in range(-(-k // g)):
        part = lowbit.quantize(w[:, j * g:(j + 1) * g], scheme)
        assert torch.equal(part.codes(), codes[:, j * g:(j + 1) * g]), j
        assert torch.equal(part.scales[0], qw.scales[j]), j
        if qw.zeros is not None:
            assert torch.equal(part.zeros[0], qw.zeros[j]), j


@pytest.mark.parametrize("scheme", ["int4-channel", "int3-g64-asym", "fp6_e3m2-channel", "fp4_e2m1-g32-mx"])
def test_non_contiguous_weight(scheme):
    w = rand_weight((96, 40), torch.float16, seed=3).T  # [40, 96] view
    assert not w.is_contiguous()
    a, b = lowbit.quantize(w, scheme), lowbit.quantize(w.contiguous(), scheme)
    for name, t in b.tensors().items():
        assert torch.equal(a.tensors()[name], t), name


# -- clipping search ------------------------------------------------------------------------------

def group_sq_err(w, qw):
    e = (qw.dequantize(torch.float32).double() - w.double()) ** 2
    return group_view(e, qw.scheme).sum(-1)  # [N, G]


CLIP_SCHEMES = [s for s in SCHEMES if s.endswith(("g32", "g128", "channel", "g32-asym", "g128-asym", "channel-asym",
                                                  "g32-mx"))]


@pytest.mark.parametrize("scheme", CLIP_SCHEMES)
def test_clip_search_never_worse_than_rtn(scheme):
    dt = DTYPES[CLIP_SCHEMES.index(scheme) % 3]
    w = rand_weight((24, 300), dt, seed=11, heavy=True)
    plain = lowbit.quantize(w, scheme)
    clip = lowbit.quantize(w, scheme, clip_search=True)
    check_quantized(w, scheme, clip, clipped=True)
    e0, e1 = group_sq_err(w, plain), group_sq_err(w, clip)
    assert (e1 <= e0 * (1 + 1e-5) + 1e-12).all(), f"clip search worse in {int((e1 > e0 * (1 + 1e-5)).sum())} groups"
    if Scheme.parse(scheme).mx:  # power-of-two scales: no search
        assert torch.equal(plain.scales, clip.scales) and torch.equal(plain.codes(), clip.codes())


@pytest.mark.parametrize("scheme", ["int4-g128", "int3-g64-asym", "int2-channel", "fp4_e2m1-g32", "fp6_e3m2-channel"])
def test_clip_search_helps_on_outliers(scheme):
    w = rand_weight((32, 512), torch.float32, seed=5, heavy=True)
    w[:, 7] *= 30  # a strong outlier column
    e0 = group_sq_err(w, lowbit.quantize(w, scheme)).sum()
    e1 = group_sq_err(w, lowbit.quantize(w, scheme, clip_search=True)).sum()
    assert e1 < e0


# -- sizes and dtypes -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,dtype", [
    ("int4-g128", torch.float16), ("int4-g128", torch.bfloat16), ("int4-g128", torch.float32),
    ("int4-g32-asym", torch.float16), ("int3-g64", torch.bfloat16), ("int8-channel", torch.float16),
    ("int8-channel-asym", torch.bfloat16), ("fp6_e3m2-channel", torch.float16), ("fp6_e2m3-g128", torch.float32),
    ("fp4_e2m1-g32-mx", torch.bfloat16), ("fp8_e4m3-g32-mx", torch.float32), ("int2-g16-asym", torch.float32),
    ("fp5_e2m2-g256", torch.float16),
], ids=lambda v: DT.get(v, v))
@pytest.mark.parametrize("shape", [(7, 576), (3, 1000), (1, 1), (16, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bits_per_weight_and_scale_dtype(scheme, dtype, shape):
    n, k = shape
    s = Scheme.parse(scheme)
    qw = lowbit.quantize(rand_weight(shape, dtype, 0), scheme)
    groups = 1 if s.per_channel else math.ceil(k / s.group_size)
    if s.mx:
        sbits, sd = 8, torch.uint8
    elif s.per_channel or dtype == torch.float32:
        sbits, sd = 32, torch.float32
    else:
        sbits, sd = 16, dtype
    assert qw.scales.dtype == sd
    zbits = 0 if s.symmetric else 8
    want = s.bits + (sbits + zbits) * groups / k
    assert qw.bits_per_weight == pytest.approx(want, rel=1e-12)
    # stored bytes: codes padded to whole 128-tiles of k and 16-row blocks, plus scales and zeros
    kp, np_ = math.ceil(k / 128) * 128, math.ceil(n / 16) * 16
    assert qw.nbytes == np_ * kp * s.bits // 8 + (sbits + zbits) // 8 * groups * n


def test_bits_per_weight_examples():
    w = rand_weight((64, 576), torch.float16, 0)
    assert lowbit.quantize(w, "int4-g128").bits_per_weight == pytest.approx(4 + 16 * 5 / 576)
    assert lowbit.quantize(w, "int4-g32-asym").bits_per_weight == pytest.approx(4 + 24 * 18 / 576)
    assert lowbit.quantize(w, "int8-channel").bits_per_weight == pytest.approx(8 + 32 / 576)
    assert lowbit.quantize(w, "fp4_e2m1-g32-mx").bits_per_weight == pytest.approx(4.25)


def test_zero_weight_every_scheme():
    w = torch.zeros(4, 70, dtype=torch.float16)
    for scheme in SCHEMES[::3] + ["fp4_e2m1-g32-mx", "int4-g32-asym"]:
        qw = lowbit.quantize(w, scheme)
        d = qw.dequantize(torch.float32)
        assert torch.equal(d, torch.zeros(4, 70)), scheme
        assert torch.isfinite(scale_values(qw)).all(), scheme


def test_extreme_magnitudes_stay_finite():
    big = torch.full((2, 64), 60000.0, dtype=torch.float16)
    big[1] *= -1
    tiny = torch.full((2, 64), 1e-30)
    for scheme in ["int2-g16", "int4-g32-asym", "fp3_e1m1-g32", "fp8_e5m2-channel", "fp4_e2m1-g32-mx", "int8-channel"]:
        for w in (big, tiny, big.bfloat16()):
            d = lowbit.quantize(w, scheme).dequantize(torch.float32)
            assert torch.isfinite(d).all(), (scheme, w.dtype)
            assert ((d - w.float()).abs() <= 0.5 * w.float().abs()).all(), (scheme, w.dtype)


@pytest.mark.parametrize("scheme,amax", [("int8-g128", 1e-3), ("int4-g128", 2e-4), ("int4-g32-asym", 2e-4),
                                         ("fp6_e3m2-g32", 1e-4)])
def test_small_fp16_groups_keep_their_resolution(scheme, amax):
    """fp16 group scales below fp16's smallest normal (6.1e-5) must not be rounded up to it: a group of
    fp16 weights with a small range is quantized about as finely as the same weights in fp32."""
    g = torch.Generator().manual_seed(0)
    w = ((torch.rand(4, 256, generator=g) * 2 - 1) * amax).half()
    e16 = (lowbit.quantize(w, scheme).dequantize(torch.float32) - w.float()).abs().max()
    e32 = (lowbit.quantize(w.float(), scheme).dequantize(torch.float32) - w.float()).abs().max()
    # a subnormal fp16 scale is coarser than an fp32 one (int8: up to ~0.5 step more error); a scale
    # rounded up to 6.1e-5 is several times too coarse
    assert e16 <= 2 * e32, f"fp16 error {e16:.3g} vs fp32 error {e32:.3g}"


# -- input errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,exc,msg", [
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    (torch.randn(16), ValueError, "2-D"),
    (torch.randn(2, 3, 16), ValueError, "2-D"),
    (torch.randint(0, 5, (4, 16)), ValueError, "dtype"),
    (torch.randn(4, 16, dtype=torch.float64), ValueError, "dtype"),
    (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "inf"),
    (torch.zeros(0, 16), ValueError, "empty"),
    (torch.zeros(16, 0), ValueError, "empty"),
], ids=["list", "1-D", "3-D", "int64", "float64", "nan", "inf", "empty-rows", "empty-cols"])
def test_bad_weights(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        lowbit.quantize(bad, "int4-g128")


def test_bad_method_and_options():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        lowbit.quantize(w, "int4-g32", method="awq")
    with pytest.raises(ValueError, match="no calibration inputs"):
        lowbit.quantize(w, "int4-g32", inputs=torch.randn(4, 32))
    with pytest.raises(ValueError, match="no calibration inputs or GPTQ options"):
        lowbit.quantize(w, "int4-g32", damp=0.01)
    with pytest.raises(ValueError, match="needs inputs"):
        lowbit.quantize(w, "int4-g32", method="gptq")
    with pytest.raises(ValueError, match="power of two"):
        lowbit.quantize(w, "int4-g48")


def test_scheme_object_and_string_agree():
    w = rand_weight((8, 200), torch.float16, 1)
    a = lowbit.quantize(w, "int4-g64-asym")
    b = lowbit.quantize(w, Scheme("int4", 64, symmetric=False))
    for name, t in a.tensors().items():
        assert torch.equal(b.tensors()[name], t)


# -- QuantizedWeight ------------------------------------------------------------------------------

def _qw(scheme="int6-g32-asym", shape=(6, 100), dtype=torch.float16):
    return lowbit.quantize(rand_weight(shape, dtype, 2), scheme)


def _rebuild(qw, **over):
    args = dict(scheme=qw.scheme, shape=qw.shape, packed=qw.packed, scales=qw.scales, zeros=qw.zeros, perm=qw.perm,
                dtype=qw.dtype)
    args.update(over)
    return QuantizedWeight(**args)


def test_rebuild_of_valid_weight_passes():
    qw = _qw()
    assert torch.equal(_rebuild(qw).dequantize(), qw.dequantize())


def _wrong_cases():
    qw = _qw()  # int6: two segments (4-bit int16, 2-bit uint8), groups of 32 over k=100 -> 4 groups
    p0, p1 = qw.packed
    s, z = qw.scales, qw.zeros
    sym = _qw("int6-g32")
    return {
        "packed-missing-segment": (qw, dict(packed=(p0,)), "segment"),
        "packed-extra-segment": (qw, dict(packed=(p0, p1, p1)), "segment"),
        "packed0-dtype": (qw, dict(packed=(p0.to(torch.int32), p1)), r"packed\[0\]"),
        "packed0-shape": (qw, dict(packed=(p0[:, :-1], p1)), r"packed\[0\]"),
        "packed1-rows": (qw, dict(packed=(p0, p1[:-1])), r"packed\[1\]"),
        "packed1-dtype": (qw, dict(packed=(p0, p1.to(torch.int16))), r"packed\[1\]"),
        "scales-transposed": (qw, dict(scales=s.T.contiguous()), "scales"),
        "scales-dtype": (qw, dict(scales=s.float()), "scales"),
        "scales-missing-group": (qw, dict(scales=s[:-1]), "scales"),
        "zeros-missing": (qw, dict(zeros=None), "zeros: required"),
        "zeros-extra": (sym, dict(zeros=torch.zeros_like(qw.zeros)), "zeros: not expected"),
        "zeros-dtype": (qw, dict(zeros=z.to(torch.int32)), "zeros"),
        "zeros-shape": (qw, dict(zeros=z[:, :-1]), "zeros"),
        "perm-length": (qw, dict(perm=torch.arange(99)), "perm"),
        "perm-dtype": (qw, dict(perm=torch.arange(100, dtype=torch.int32)), "perm"),
        "perm-2d": (qw, dict(perm=torch.arange(100).view(1, 100)), "perm"),
        "shape-k": (qw, dict(shape=(6, 200)), "packed"),
        "shape-n": (qw, dict(shape=(17, 100)), "packed"),  # another row block
        "shape-zero": (qw, dict(shape=(0, 100)), "positive"),
        "dtype-int8": (qw, dict(dtype=torch.int8), "dtype"),
        "dtype-fp32": (qw, dict(dtype=torch.float32), "scales"),  # fp32 weights keep fp32 group scales
        "scheme-bits": (qw, dict(scheme=Scheme("int5", 32, symmetric=False)), "packed"),
        "scheme-group": (qw, dict(scheme=Scheme("int6", 64, symmetric=False)), "scales"),
        "packed1-device": (qw, dict(packed=(p0, p1.to("meta"))), "one device"),
        "zeros-device": (qw, dict(zeros=z.to("meta")), "one device"),
        "perm-device": (qw, dict(perm=torch.arange(100).to("meta")), "one device"),
    }


WRONG = ["packed-missing-segment", "packed-extra-segment", "packed0-dtype", "packed0-shape", "packed1-rows",
         "packed1-dtype", "scales-transposed", "scales-dtype", "scales-missing-group", "zeros-missing", "zeros-extra",
         "zeros-dtype", "zeros-shape", "perm-length", "perm-dtype", "perm-2d", "shape-k", "shape-n", "shape-zero",
         "dtype-int8", "dtype-fp32", "scheme-bits", "scheme-group", "packed1-device", "zeros-device", "perm-device"]


@pytest.mark.parametrize("case", WRONG)
def test_validate_rejects_wrong_tensors(case):
    cases = _wrong_cases()
    assert sorted(cases) == sorted(WRONG)
    qw, over, msg = cases[case]
    with pytest.raises(ValueError, match=msg):
        _rebuild(qw, **over)


@pytest.mark.parametrize("scheme", ["int6-g32-asym", "int4-g128", "fp4_e2m1-g32-mx", "int7-channel",
                                    "fp6_e3m2-channel", "int3-g64", "fp5_e2m2-g32", "int4-g128-2:4",
                                    "int8-channel-asym-2:4"])
def test_tensors_meta_round_trip(scheme):
    qw = _qw(scheme, (9, 333), torch.bfloat16)
    t, m = qw.tensors(), qw.meta()
    nseg = len(lpack.SEGMENTS[qw.scheme.code_bits])
    want = {f"packed_{i}" for i in range(nseg)} | {"scales"} | (set() if qw.scheme.symmetric else {"zeros"})
    assert set(t) == want
    assert m == {"scheme": scheme, "shape": [9, 333], "dtype": "bfloat16", "layout": lpack.LAYOUT}
    back = QuantizedWeight.from_tensors({k: v.clone() for k, v in t.items()}, dict(m))
    assert back.scheme == qw.scheme and back.shape == qw.shape and back.dtype == qw.dtype
    for k, v in back.tensors().items():
        assert torch.equal(v, t[k]) and v.dtype == t[k].dtype
    assert torch.equal(back.dequantize(), qw.dequantize())
    moved = qw.to("cpu")
    assert moved.device == torch.device("cpu")
    for k, v in moved.tensors().items():
        assert torch.equal(v, t[k])
    assert scheme in repr(qw)


@pytest.mark.parametrize("mutate,msg", [
    (lambda t, m: t.pop("scales"), "missing tensor"),
    (lambda t, m: t.pop("zeros"), "missing tensor"),
    (lambda t, m: t.pop("packed_1"), "missing tensor"),
    (lambda t, m: t.__setitem__("bias", torch.zeros(6)), "unexpected tensor"),
    (lambda t, m: t.__setitem__("packed_2", torch.zeros(6)), "unexpected tensor"),
    (lambda t, m: m.__setitem__("layout", "tiled-planes-v1"), "layout"),
    (lambda t, m: m.pop("layout"), "layout"),
    (lambda t, m: m.__setitem__("dtype", "Tensor"), "dtype"),
    (lambda t, m: m.__setitem__("dtype", "half-ish"), "dtype"),
    (lambda t, m: m.__setitem__("shape", [6]), "shape"),
    (lambda t, m: m.__setitem__("shape", [6, "100"]), "shape"),
    (lambda t, m: m.__setitem__("scheme", "int6-g48-asym"), "power of two"),
    (lambda t, m: m.__setitem__("scheme", "int6-g32"), "unexpected tensor"),  # zeros present for a sym scheme
    (lambda t, m: m.__setitem__("scheme", "int4-g32-asym"), "unexpected tensor"),  # packed_1 extra for int4
    (lambda t, m: m.__setitem__("shape", [6, 300]), "packed"),
    (lambda t, m: t.__setitem__("scales", t["scales"].float()), "scales"),
], ids=["no-scales", "no-zeros", "no-packed_1", "extra-bias", "extra-packed_2", "old-layout", "no-layout",
        "dtype-not-dtype", "dtype-unknown", "shape-1d", "shape-str", "scheme-invalid", "scheme-sym", "scheme-bits",
        "shape-wrong", "scales-fp32"])
def test_from_tensors_rejects(mutate, msg):
    qw = _qw()
    t, m = dict(qw.tensors()), dict(qw.meta())
    mutate(t, m)
    with pytest.raises(ValueError, match=msg):
        QuantizedWeight.from_tensors(t, m)


@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g64-asym", "fp6_e3m2-channel", "fp4_e2m1-g32-mx"])
def test_perm_dequantize_returns_original_column_order(scheme):
    k = 200
    w = rand_weight((12, k), torch.float16, 9)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(4))
    stored = lowbit.quantize(w[:, perm], scheme)  # codes hold W[:, perm]
    qw = _rebuild(stored, perm=perm)
    d = qw.dequantize(torch.float32)
    # column perm[j] of the result is stored column j
    assert torch.equal(d[:, perm], stored.dequantize(torch.float32))
    inv = torch.argsort(perm)
    assert torch.equal(d, stored.dequantize(torch.float32)[:, inv])
    # and it approximates W in its original order (not W[:, perm])
    assert (d - w.float()).norm() < 0.5 * (d - w[:, perm].float()).norm()
    assert set(qw.tensors()) >= {"perm"}
    back = QuantizedWeight.from_tensors(qw.tensors(), qw.meta())
    assert torch.equal(back.perm, perm) and torch.equal(back.dequantize(), qw.dequantize())
    # matmul reads x[..., perm]: same as x @ dequantize().T
    x = torch.randn(3, k)
    assert torch.allclose(lowbit.matmul(x, qw, backend="reference"), x @ d.T, rtol=1e-5, atol=1e-5)
