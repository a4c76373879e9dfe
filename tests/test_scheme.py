"""lowbit.Scheme: the grammar FORMAT-GRANULARITY[-asym][-mx][-2:4], its round trip and its errors."""

import pytest

from lowbit import Scheme

# (text, canonical str, format, group_size, symmetric, mx, sparsity)
VALID = [
    ("int4-g128", "int4-g128", "int4", 128, True, False, None),
    ("int4-g32-asym", "int4-g32-asym", "int4", 32, False, False, None),
    ("fp6_e3m2-channel", "fp6_e3m2-channel", "fp6_e3m2", -1, True, False, None),
    ("int8-channel", "int8-channel", "int8", -1, True, False, None),
    ("fp4_e2m1-g32-mx", "fp4_e2m1-g32-mx", "fp4_e2m1", 32, True, True, None),
    ("int4-g128-2:4", "int4-g128-2:4", "int4", 128, True, False, "2:4"),
    ("int4-g128-asym-2:4", "int4-g128-asym-2:4", "int4", 128, False, False, "2:4"),
    ("int4-g128-2:4-asym", "int4-g128-asym-2:4", "int4", 128, False, False, "2:4"),  # flags in any order
    ("fp8_e4m3-g32-mx-2:4", "fp8_e4m3-g32-mx-2:4", "fp8_e4m3", 32, True, True, "2:4"),
    ("fp6-channel", "fp6_e3m2-channel", "fp6_e3m2", -1, True, False, None),
    ("fp5-g64", "fp5_e2m2-g64", "fp5_e2m2", 64, True, False, None),
    ("fp4-g32-mx", "fp4_e2m1-g32-mx", "fp4_e2m1", 32, True, True, None),
    ("fp8-channel", "fp8_e4m3-channel", "fp8_e4m3", -1, True, False, None),
    ("int2-g16", "int2-g16", "int2", 16, True, False, None),
    ("int3-g64", "int3-g64", "int3", 64, True, False, None),
    ("int3-g1024-asym", "int3-g1024-asym", "int3", 1024, False, False, None),
    ("int8-channel-asym", "int8-channel-asym", "int8", -1, False, False, None),
    ("fp6_e2m3-channel", "fp6_e2m3-channel", "fp6_e2m3", -1, True, False, None),
    ("fp5_e3m1-g256", "fp5_e3m1-g256", "fp5_e3m1", 256, True, False, None),
    ("fp3_e1m1-g128", "fp3_e1m1-g128", "fp3_e1m1", 128, True, False, None),
    ("fp3_e2m0-g128-mx", "fp3_e2m0-g128-mx", "fp3_e2m0", 128, True, True, None),
    ("fp8_e5m2-g128", "fp8_e5m2-g128", "fp8_e5m2", 128, True, False, None),
]


@pytest.mark.parametrize("text,canon,fmt,group,sym,mx,sparsity", VALID, ids=[v[0] for v in VALID])
def test_parse(text, canon, fmt, group, sym, mx, sparsity):
    s = Scheme.parse(text)
    assert (s.format, s.group_size, s.symmetric, s.mx, s.sparsity) == (fmt, group, sym, mx, sparsity)
    assert str(s) == canon
    assert Scheme.parse(str(s)) == s
    assert Scheme.parse(canon) == s
    assert s.per_channel == (group == -1)
    assert s.bits == int(fmt[3:] if fmt.startswith("int") else fmt[2])
    # the constructor gives the same scheme
    assert Scheme(fmt, group, symmetric=sym, sparsity=sparsity, mx=mx) == s
    assert hash(Scheme(fmt, group, symmetric=sym, sparsity=sparsity, mx=mx)) == hash(s)


def test_parse_accepts_a_scheme_and_whitespace():
    s = Scheme("int4", 128)
    assert Scheme.parse(s) is s
    assert Scheme.parse(" int4-g128 ") == s


def test_constructor_defaults_and_aliases():
    s = Scheme("int4")
    assert (s.group_size, s.symmetric, s.sparsity, s.mx) == (128, True, None, False)
    assert Scheme("fp6", -1).format == "fp6_e3m2"
    assert Scheme("fp6", -1) == Scheme.parse("fp6_e3m2-channel")
    assert Scheme("fp4").fmt.name == "fp4_e2m1"


# (text, substring of the error that says what is allowed)
INVALID = [
    ("int4-g48", "power of two >= 16"),
    ("int4-g8", "power of two >= 16"),
    ("int4-g0", "power of two >= 16"),
    ("int4-g1", "power of two >= 16"),
    ("int4-g100", "power of two >= 16"),
    ("int4-g", "gG"),
    ("int4-gabc", "gG"),
    ("int4-128", "gG"),
    ("int4-perchannel", "gG"),
    ("int4-g\u00b2", "gG"),  # '²'.isdigit() is True, but it is no group size
    ("int4", "FORMAT-gG"),
    ("int4-", "gG"),
    ("", "int4-g128"),
    ("fp6_e3m2-channel-asym", "integer formats only"),
    ("fp4_e2m1-g32-asym", "integer formats only"),
    ("int4-g32-mx", "floating formats only"),
    ("fp4_e2m1-channel-mx", "group size"),
    ("int4-g128-sym", "allowed: asym, mx, 2:4"),
    ("int4-g128-1:2", "allowed: asym, mx, 2:4"),
    ("int4-g128-asym-asym", "repeated"),
    ("fp4_e2m1-g32-mx-mx", "repeated"),
    ("int4-g128-2:4-2:4", "repeated"),
    ("int9-g128", "2 to 8"),
    ("int1-channel", "2 to 8"),
    ("fp9_e4m4-g128", "<= 8"),
    ("fp8_e4m4-g128", "1 + E + M"),
    ("nf4-g64", "int2..int8"),
    ("float16-channel", "int2..int8"),
]


@pytest.mark.parametrize("text,needle", INVALID, ids=[t or "empty" for t, _ in INVALID])
def test_invalid_schemes_raise_helpful_value_error(text, needle):
    with pytest.raises(ValueError) as e:
        Scheme.parse(text)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(format="int4", group_size=48), "power of two"),
    (dict(format="int4", group_size=8), "power of two"),
    (dict(format="int4", group_size=0), "power of two"),
    (dict(format="int4", group_size=-2), "power of two"),
    (dict(format="int4", group_size=-128), "power of two"),
    (dict(format="int4", group_size=True), "must be an int"),
    (dict(format="int4", group_size=128.0), "must be an int"),
    (dict(format="int4", group_size="128"), "must be an int"),
    (dict(format="fp6_e3m2", group_size=-1, symmetric=False), "integer formats only"),
    (dict(format="int4", mx=True), "floating formats only"),
    (dict(format="fp4_e2m1", group_size=-1, mx=True), "group size"),
    (dict(format="int4", sparsity="1:2"), "'2:4'"),
    (dict(format="int4", sparsity="2:4:"), "'2:4'"),
    (dict(format="int10"), "int2..int8"),
    (dict(format="int7", sparsity="2:4"), "int7 has no 2:4 variant"),
    (dict(format="fp7_e3m3", group_size=-1, sparsity="2:4"), "9-bit codes"),
    (dict(format="fp7_e5m1", sparsity="2:4"), "2 to 6 or of 8 bits"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v))
def test_invalid_constructor_arguments(kwargs, needle):
    with pytest.raises(ValueError) as e:
        Scheme(**kwargs)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("bad", [None, 4, b"int4-g128"], ids=["None", "int", "bytes"])
def test_parse_non_string(bad):
    with pytest.raises(ValueError, match="int4-g128"):
        Scheme.parse(bad)


def test_schemes_are_frozen_values():
    s = Scheme.parse("int4-g128")
    with pytest.raises(AttributeError):
        s.group_size = 64
    assert {Scheme.parse("int4-g128"), Scheme.parse("int4-g128"), Scheme.parse("int4-g64")} == \
        {Scheme("int4", 128), Scheme("int4", 64)}


@pytest.mark.parametrize("text,code_bits", [("int4-g128", 4), ("int7-channel", 7), ("int2-g16-2:4", 4),
                                            ("int4-g128-2:4", 6), ("fp6_e3m2-channel-2:4", 8),
                                            ("int8-channel-2:4", 10), ("fp8_e4m3-g32-mx-2:4", 10)])
def test_code_bits_add_the_2bit_position_for_2of4(text, code_bits):
    assert Scheme.parse(text).code_bits == code_bits


@pytest.mark.parametrize("k,stored", [(1, 2), (2, 2), (3, 2), (4, 2), (5, 4), (128, 64), (130, 66), (333, 168)])
def test_stored_columns(k, stored):
    assert Scheme.parse("int4-g128-2:4").stored_columns(k) == stored  # two per group of four, K padded to 4
    assert Scheme.parse("int4-g128").stored_columns(k) == k


def test_7bit_formats_have_no_2of4_variant_in_the_grammar_either():
    with pytest.raises(ValueError, match="int7 has no 2:4 variant"):
        Scheme.parse("int7-g128-2:4")
    assert Scheme.parse("int7-g128").sparsity is None


def test_parsed_schemes_are_shared_and_pickle_without_their_format():
    """``Scheme.parse`` caches by text (one instance per string); the cached ``fmt`` stays out of pickles
    and copies, which rebuild from the fields (the format object holds per-device tables)."""
    import copy
    import pickle

    from lowbit import formats

    s = Scheme.parse("int4-g128-asym")
    assert Scheme.parse("int4-g128-asym") is s and s.fmt is formats.get("int4")
    data = pickle.dumps(s)
    assert b"IntFormat" not in data and len(data) < 300
    for clone in (pickle.loads(data), copy.deepcopy(s), copy.copy(s)):
        assert clone == s and hash(clone) == hash(s) and clone.fmt is formats.get("int4")
    with pytest.raises(ValueError, match="granularity"):
        Scheme.parse("int4-q7")
    with pytest.raises(ValueError, match="granularity"):  # errors are not cached away
        Scheme.parse("int4-q7")
