"""2:4 sparsity: the mask, the compressed storage and its inverse, RTN (magnitude) and GPTQ (SparseGPT)
pruning, QuantizedWeight, matmul, checkpoints and the integrations that refuse sparse weights.

Every sparse weight is checked against what the test computes on its own: positions and values decoded
from the stored codes by hand (``(value << 2) | position``, one Python loop), the kept entries against
a sort of each group of four, and the values against RTN of the hand-pruned weight under the dense scheme.
"""

import json
import math

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import lowbit
from lowbit import QuantizedWeight, QuantLinear, Scheme, formats, sparsity
from lowbit import pack as lpack
from lowbit.quantize.rtn import build
from test_quantize import _rebuild  # QuantizedWeight from a weight's tensors, some replaced

pytestmark = pytest.mark.usefixtures("one_thread")

# Every format kind, group / channel / asym / mx, 4-, 6-, 8- and 10-bit codes.
SCHEMES = ["int4-g128-2:4", "int4-g32-asym-2:4", "int8-channel-2:4", "int8-g64-asym-2:4", "int3-g64-2:4",
           "int2-g16-asym-2:4", "int6-channel-2:4", "fp6_e3m2-channel-2:4", "fp6_e2m3-g32-2:4", "fp4_e2m1-g32-2:4",
           "fp4_e2m1-g32-mx-2:4", "fp8_e4m3-g32-2:4", "fp8_e4m3-channel-2:4", "fp8_e5m2-g128-mx-2:4",
           "fp5_e2m2-g128-2:4", "fp3_e1m1-channel-2:4"]
SHAPES = [(3, 1), (2, 2), (4, 3), (5, 5), (6, 130), (3, 333), (8, 256), (2, 517)]  # every K mod 4, and K mod 128


def rand_weight(shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05 * torch.exp(torch.randn(shape, generator=g))).to(dtype)


def dense_scheme(scheme: str) -> str:
    return scheme.removesuffix("-2:4")


# -- independent references -------------------------------------------------------------------------

def hand_decode(qw: QuantizedWeight):
    """(dense float32 weight, kept columns per row) from the stored codes, one entry at a time."""
    scheme = qw.scheme
    n, k = qw.shape
    table = formats.get(scheme.format).values().tolist()
    scales = qw.scales.to(torch.float64)
    scales = (2.0 ** (scales - 127) if scheme.mx else scales).tolist()  # [G][N]
    zeros = None if qw.zeros is None else qw.zeros.tolist()
    codes = qw.codes()
    assert tuple(codes.shape) == (n, 2 * math.ceil(k / 4))
    out = [[0.0] * k for _ in range(n)]
    kept = [[] for _ in range(n)]
    for r, row in enumerate(codes.tolist()):
        for c in range(0, len(row), 2):
            pos = [row[c] & 3, row[c + 1] & 3]
            assert pos[0] < pos[1], (r, c, pos)
            for s in range(2):
                value_code, col = row[c + s] >> 2, 4 * (c // 2) + pos[s]
                group = 0 if scheme.group_size == -1 else col // scheme.group_size
                if zeros is None:
                    value = table[value_code]
                else:
                    value = value_code - zeros[group][r]
                if col >= k:  # a padding column (last group of one column): its code must mean zero
                    assert value == 0, (r, c, value_code)
                    continue
                out[r][col] = value * scales[group][r]  # exact in float64: one rounding to float32 below
                kept[r].append(col)
    return torch.tensor(out, dtype=torch.float64).to(torch.float32), kept


def magnitude_kept(w: torch.Tensor) -> list[list[int]]:
    """Per row, the columns magnitude 2:4 pruning keeps: the two largest |w| of each group of four
    (ties: the lower column), every column of a last group of one or two."""
    out = []
    for row in w.float().abs().tolist():
        cols = []
        for j in range(0, len(row), 4):
            group = list(range(j, min(j + 4, len(row))))
            cols += sorted(sorted(group, key=lambda c: (-row[c], c))[:2])
        out.append(cols)
    return out


def prune(w: torch.Tensor, kept: list[list[int]]) -> torch.Tensor:
    mask = torch.zeros(w.shape, dtype=torch.bool)
    for r, cols in enumerate(kept):
        mask[r, cols] = True
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype))


def nonzeros_per_group(d: torch.Tensor) -> torch.Tensor:
    n, k = d.shape
    return (torch.nn.functional.pad(d, (0, -k % 4)) != 0).view(n, -1, 4).sum(-1)


# -- lowbit.sparsity ------------------------------------------------------------------------------------

def test_keep_mask_by_hand():
    saliency = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 3.0, 2.0, 0.5, 7.0],
                             [1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 1.0, 0.0],
                             [4.0, 1.0, 3.0, 2.0, 5.0, 0.0, 0.0, 6.0, 1.0]])
    want = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 1],   # all zero: the two lowest columns; last group of one: kept
                         [1, 1, 0, 0, 0, 1, 1, 0, 1],   # ties go to the lower column
                         [1, 0, 1, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(sparsity.keep_mask(saliency), want)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 7])
def test_keep_mask_last_group_widths(k):
    keep = sparsity.keep_mask(torch.rand(5, k))
    last = keep[:, (k - 1) // 4 * 4:]
    assert (last.sum(1) == min(2, last.shape[1])).all()


def test_positions_by_hand():
    keep = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0, 1],
                         [0, 0, 1, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    # the last group of one column is completed with its first padding position (1)
    assert sparsity.positions(keep).tolist() == [[0, 3, 1, 2, 0, 1], [2, 3, 0, 1, 0, 1]]
    cols = sparsity.dense_columns(sparsity.positions(keep))
    assert cols.tolist() == [[0, 3, 5, 6, 8, 9], [2, 3, 4, 5, 8, 9]]


@pytest.mark.parametrize("keep", [[[1, 1, 1, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0, 1]], [[1, 1, 0, 0, 1, 0, 0]],
                                  [[1, 1, 0, 0, 1, 0]], [[1, 1, 0, 0, 0]]],
                         ids=["three", "one", "none-in-a-full-group", "last-group-of-three-keeps-one",
                              "last-group-of-two-keeps-one", "last-group-of-one-keeps-none"])
def test_positions_reject_masks_that_are_not_2of4(keep):
    with pytest.raises(ValueError, match="exactly 2 entries in every group of 4"):
        sparsity.positions(torch.tensor(keep, dtype=torch.bool))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_every_value_and_position_round_trips_through_pack(bits):
    """(value << 2) | position of every value code and every position pair, packed as bits + 2 and read
    back by QuantizedWeight.codes()."""
    pairs = [(p0, p1) for p0 in range(4) for p1 in range(p0 + 1, 4)]
    values = torch.arange(1 << bits)
    rows = []
    for p0, p1 in pairs:
        row_values = torch.stack([values, values.flip(0)], 1).reshape(-1)  # two kept values per group
        row_positions = torch.tensor([p0, p1]).repeat(1 << bits)
        rows.append((row_values, row_positions))
    repeats = math.ceil(300 / rows[0][0].numel())  # at least 300 stored columns: three 128-tiles
    value_codes = torch.stack([v for v, _ in rows]).to(torch.uint8).repeat(1, repeats)
    positions = torch.stack([p for _, p in rows]).repeat(1, repeats)
    codes = sparsity.merge_codes(value_codes, positions, bits)
    assert codes.dtype == lpack.code_dtype(bits + 2)
    assert torch.equal(codes.long(), value_codes.long() * 4 + positions)
    n = codes.shape[0]
    for kc in (2, 66, 128, 130, 300):  # partial tiles, whole tiles
        part = codes[:, :kc].contiguous()
        qw = QuantizedWeight(f"int{bits}-channel-2:4", (n, 2 * kc), lpack.pack_codes(part, bits + 2, sparse=True),
                             torch.ones(1, n), dtype=torch.float32)
        back = qw.codes()
        assert torch.equal(back, part)
        v, p = sparsity.split_codes(back)
        assert torch.equal(v, value_codes[:, :kc]) and torch.equal(p, positions[:, :kc])
    sparsity.check_positions(positions)


def test_check_positions_rejects_equal_or_descending_pairs():
    sparsity.check_positions(torch.tensor([[0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"row 1, group 1 are \[2, 2\]"):
        sparsity.check_positions(torch.tensor([[0, 1, 0, 3], [0, 3, 2, 2]]))
    with pytest.raises(ValueError, match="p0 < p1"):
        sparsity.check_positions(torch.tensor([[3, 1]]))


def test_scatter_crops_the_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    d = sparsity.scatter(values, sparsity.dense_columns(torch.tensor([[1, 3, 0, 1]])), 5)
    assert d.tolist() == [[0.0, 1.0, 0.0, 2.0, 3.0]]  # 4.0 sat in a padding column


# -- RTN: magnitude pruning ------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_rtn_prunes_by_magnitude_and_dequantizes_exactly(scheme):
    i = SCHEMES.index(scheme)
    for j, shape in enumerate(SHAPES):
        dtype = (torch.float16, torch.bfloat16, torch.float32)[(i + j) % 3]
        w = rand_weight(shape, dtype, seed=10 * i + j)
        qw = lowbit.quantize(w, scheme)
        where = f"{scheme} {dtype} {shape}"
        assert qw.shape == shape and qw.dtype == dtype and str(qw.scheme) == scheme, where
        d32 = qw.dequantize(torch.float32)
        hand, kept = hand_decode(qw)
        assert torch.equal(d32, hand), where
        assert torch.equal(qw.dequantize(), hand.to(dtype)), where
        assert nonzeros_per_group(d32).max() <= 2, where
        # magnitude pruning: the two largest |w| of every four are the kept entries
        assert kept == magnitude_kept(w), where
        # the values: RTN of the pruned weight under the dense scheme (scales from what is kept)
        dense = lowbit.quantize(prune(w, kept), dense_scheme(scheme))
        assert torch.equal(d32, dense.dequantize(torch.float32)), where
        assert torch.equal(qw.scales, dense.scales), where
        if scheme.startswith("fp8_e4m3"):
            assert not (((qw.codes() >> 2) & 0x7F) == 0x7F).any(), where  # never the NaN code


@pytest.mark.parametrize("scheme", ["int4-g32-2:4", "int4-g64-asym-2:4", "fp4_e2m1-g32-2:4"])
def test_rtn_clip_search_fits_the_pruned_weight(scheme):
    w = rand_weight((16, 200), torch.float16, seed=3)
    qw = lowbit.quantize(w, scheme, clip_search=True)
    _, kept = hand_decode(qw)
    assert kept == magnitude_kept(w)
    dense = lowbit.quantize(prune(w, kept), dense_scheme(scheme), clip_search=True)
    assert torch.equal(qw.dequantize(torch.float32), dense.dequantize(torch.float32))
    plain = lowbit.quantize(w, scheme)
    wf = prune(w, kept).float()
    assert (qw.dequantize(torch.float32) - wf).norm() <= (plain.dequantize(torch.float32) - wf).norm()


def test_zero_and_constant_weights():
    w = torch.zeros(3, 9, dtype=torch.float16)
    w[1] = 0.5
    for scheme in SCHEMES:
        qw = lowbit.quantize(w, scheme)
        d, kept = hand_decode(qw)
        assert torch.equal(qw.dequantize(torch.float32), d), scheme
        assert kept[0] == [0, 1, 4, 5, 8] and kept[1] == [0, 1, 4, 5, 8], scheme  # ties: the lower columns
        assert (d[0] == 0).all() and nonzeros_per_group(d).max() <= 2, scheme


@pytest.mark.parametrize("scheme,shape,want", [
    ("int4-g128-2:4", (64, 4096), 6 * 2048 / 4096 + 16 * 32 / 4096),     # 3.125
    ("int8-channel-2:4", (8, 4096), 10 / 2 + 32 / 4096),
    ("int4-g32-asym-2:4", (8, 4096), 3 + (16 + 8) / 32),
    ("fp4_e2m1-g32-mx-2:4", (8, 256), 3 + 8 / 32),
    ("fp6_e3m2-channel-2:4", (8, 130), 8 * 66 / 130 + 32 / 130),           # K padded to 132: 66 stored columns
    ("int4-g128-2:4", (8, 1), 6 * 2 + 16),
])
def test_bits_per_weight_and_nbytes(scheme, shape, want):
    n, k = shape
    qw = lowbit.quantize(rand_weight(shape, torch.float16), scheme)
    assert qw.bits_per_weight == pytest.approx(want, rel=1e-12)
    s = Scheme.parse(scheme)
    bits = s.bits + 2
    stored = 2 * math.ceil(k / 4)  # (segment_shape adds the layout's padding of the stored columns)
    code_bytes = sum(math.prod(lpack.segment_shape(n, stored, bits, seg)) * lpack.segment_dtype(bits, seg).itemsize
                     for seg in lpack.SEGMENTS[bits])
    scale_bytes = qw.scales.numel() * qw.scales.element_size() + (0 if qw.zeros is None else qw.zeros.numel())
    assert qw.nbytes == code_bytes + scale_bytes


def test_sparse_is_smaller_than_dense_of_the_same_format():
    w = rand_weight((16, 1024))
    assert lowbit.quantize(w, "int4-g128-2:4").nbytes < 0.8 * lowbit.quantize(w, "int4-g128").nbytes
    assert lowbit.quantize(w, "int8-channel-2:4").bits_per_weight < 0.63 * lowbit.quantize(w, "int8-channel").bits_per_weight


# -- GPTQ: SparseGPT -------------------------------------------------------------------------------------

def correlated_inputs(n_rows, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, k // 8, generator=g) @ torch.randn(k // 8, k, generator=g) + \
        0.1 * torch.randn(n_rows, k, generator=g)


def output_error(x, w, qw):
    ref = x @ w.float().T
    return float((x @ qw.dequantize(torch.float32).T - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("scheme", ["int4-g128-2:4", "int8-channel-2:4", "fp6_e3m2-channel-2:4", "int4-g32-asym-2:4"])
def test_sparsegpt_beats_magnitude_pruning_on_correlated_inputs(scheme):
    k = 256
    x = correlated_inputs(1024, k)
    w = rand_weight((48, k), torch.float32, seed=1)
    magnitude = lowbit.quantize(w, scheme)
    sparsegpt = lowbit.quantize(w, scheme, method="gptq", inputs=x)
    d = sparsegpt.dequantize(torch.float32)
    hand, _ = hand_decode(sparsegpt)
    assert torch.equal(d, hand) and nonzeros_per_group(d).max() <= 2
    e_mag, e_sgpt = output_error(x, w, magnitude), output_error(x, w, sparsegpt)
    assert e_sgpt < 0.3 * e_mag, f"SparseGPT {e_sgpt:.4f} vs magnitude {e_mag:.4f}"


@pytest.mark.parametrize("scheme", ["int4-g32-2:4", "int8-channel-2:4", "fp6_e3m2-channel-2:4", "fp4_e2m1-g32-mx-2:4"])
def test_sparsegpt_with_identity_hessian_is_magnitude_pruning(scheme):
    """H = I: no error to spread and equal saliency weights, so SparseGPT is magnitude 2:4 + RTN (the
    largest entry of each four is kept, so the symmetric scales of the group are the same too)."""
    w = rand_weight((12, 203), torch.float16, seed=2)
    sparsegpt = lowbit.quantize(w, scheme, method="gptq", hessian=torch.eye(203))
    magnitude = lowbit.quantize(w, scheme)
    for name, t in magnitude.tensors().items():
        assert torch.equal(sparsegpt.tensors()[name], t), name


def test_sparsegpt_keeps_small_weights_of_loud_inputs():
    """Saliency w^2 / [H^-1]_jj^2: a small weight whose input has a large variance costs more output error
    when pruned than a larger weight of a quiet input, so SparseGPT keeps it and magnitude pruning does not."""
    w = torch.tensor([[0.2, 1.0, 0.9, 0.8], [1.0, 0.3, 0.9, 0.1]]).repeat(1, 8)
    h = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0]).repeat(8))
    _, kept = hand_decode(lowbit.quantize(w, "int8-channel-2:4", method="gptq", hessian=h))
    assert kept[0][:2] == [0, 1] and kept[1][:2] == [0, 2]
    _, kept = hand_decode(lowbit.quantize(w, "int8-channel-2:4"))
    assert kept[0][:2] == [1, 2] and kept[1][:2] == [0, 2]


@pytest.mark.parametrize("block_size", [1, 6, 13])
def test_sparsegpt_blocks_not_aligned_to_groups_of_four(block_size):
    """The lazy batch updates do not change the result: a group of four that straddles two blocks
    is chosen from its error-updated columns all the same."""
    k = 90
    x = correlated_inputs(512, k, seed=4)
    w = rand_weight((8, k), torch.float32, seed=5)
    aligned = lowbit.quantize(w, "int4-g32-2:4", method="gptq", inputs=x)
    ragged = lowbit.quantize(w, "int4-g32-2:4", method="gptq", inputs=x, block_size=block_size)
    assert nonzeros_per_group(ragged.dequantize(torch.float32)).max() <= 2
    e_aligned, e_ragged = output_error(x, w, aligned), output_error(x, w, ragged)
    assert abs(e_ragged - e_aligned) <= 1e-3 * e_aligned


def test_sparse_gptq_refuses_act_order():
    w, x = torch.randn(8, 64), torch.randn(32, 64)
    with pytest.raises(ValueError, match="act_order cannot be combined with int4-g32-2:4"):
        lowbit.quantize(w, "int4-g32-2:4", method="gptq", inputs=x, act_order=True)


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_quantize_model_gptq_sparse(tiny_llama):
    import copy

    from lowbit.quantize.gptq import quantize_model_gptq

    calibration = torch.randint(0, 128, (4, 32))
    model = quantize_model_gptq(copy.deepcopy(tiny_llama), "int4-g32-2:4", calibration, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for m in layers:
        assert str(m.scheme) == "int4-g32-2:4"
        assert nonzeros_per_group(m.qweight.dequantize(torch.float32)).max() <= 2
    with torch.no_grad():
        assert torch.isfinite(model(calibration).logits).all()
    with pytest.raises(ValueError, match="act_order cannot be combined"):
        quantize_model_gptq(copy.deepcopy(tiny_llama), "int4-g32-2:4", calibration, act_order=True, progress=False)


# -- QuantizedWeight, build, matmul ---------------------------------------------------------------------

def test_validate_rejects_wrong_tensors_for_sparse_schemes():
    qw = lowbit.quantize(rand_weight((6, 200)), "int4-g32-2:4")  # 6-bit codes: segments (4, 2), 100 columns
    dense = lowbit.quantize(rand_weight((6, 200)), "int4-g32")
    # the segments of 6-bit codes of 100 stored columns
    assert [(tuple(p.shape), p.dtype) for p in qw.packed] == \
        [(lpack.segment_shape(6, 100, 6, s), lpack.segment_dtype(6, s)) for s in (4, 2)]
    with pytest.raises(ValueError, match="act-order"):
        _rebuild(qw, perm=torch.arange(200))
    with pytest.raises(ValueError, match="2 segment"):
        _rebuild(qw, packed=dense.packed)
    with pytest.raises(ValueError, match="1 segment"):
        _rebuild(dense, packed=qw.packed)
    with pytest.raises(ValueError, match=r"packed\[0\]"):
        _rebuild(qw, shape=(6, 300))  # 150 stored columns: two tiles
    i8 = lowbit.quantize(rand_weight((6, 200)), "int8-channel-2:4")
    assert [p.dtype for p in i8.packed] == [lpack.segment_dtype(10, s) for s in lpack.SEGMENTS[10]]  # 10-bit codes
    with pytest.raises(ValueError, match=r"packed\[0\] \(\d-bit segment\): expected"):
        _rebuild(i8, packed=(i8.packed[0].to(torch.int64), *i8.packed[1:]))


def test_tensors_meta_round_trip():
    qw = lowbit.quantize(rand_weight((9, 333), torch.bfloat16), "int8-g64-asym-2:4")
    t, m = qw.tensors(), qw.meta()
    assert set(t) == {f"packed_{i}" for i in range(len(lpack.SEGMENTS[10]))} | {"scales", "zeros"}
    assert m["scheme"] == "int8-g64-asym-2:4" and m["shape"] == [9, 333]
    back = QuantizedWeight.from_tensors({k: v.clone() for k, v in t.items()}, dict(m))
    assert torch.equal(back.dequantize(), qw.dequantize())
    with pytest.raises(ValueError, match="unexpected tensor"):
        QuantizedWeight.from_tensors(t, {**m, "scheme": "int8-g64-asym"})  # 8-bit codes: one segment
    with pytest.raises(ValueError, match="missing tensor"):
        QuantizedWeight.from_tensors({k: v for k, v in t.items() if k != "packed_1"}, m)
    with pytest.raises(ValueError, match="act-order"):
        QuantizedWeight.from_tensors({**t, "perm": torch.arange(333)}, m)


def test_build_checks_the_mask():
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    scales = torch.ones(2, 1, dtype=torch.float16)
    keep = sparsity.keep_mask(torch.rand(2, 8))
    assert build(Scheme.parse("int4-g32-2:4"), codes, scales, None, torch.float16, keep=keep).shape == (2, 8)
    with pytest.raises(ValueError, match="keep .* is required for int4-g32-2:4"):
        build(Scheme.parse("int4-g32-2:4"), codes, scales, None, torch.float16)
    with pytest.raises(ValueError, match="not expected for int4-g32"):
        build(Scheme.parse("int4-g32"), codes, scales, None, torch.float16, keep=keep)
    with pytest.raises(ValueError, match=r"keep must be bool \(2, 8\)"):
        build(Scheme.parse("int4-g32-2:4"), codes, scales, None, torch.float16, keep=keep[:, :4])
    with pytest.raises(ValueError, match="exactly 2 entries"):
        build(Scheme.parse("int4-g32-2:4"), codes, scales, None, torch.float16, keep=torch.ones(2, 8, dtype=torch.bool))


@pytest.mark.parametrize("scheme", ["int4-g128-2:4", "int8-channel-2:4", "fp6_e3m2-channel-2:4", "int3-g64-asym-2:4"])
@pytest.mark.parametrize("xdt", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_reference_and_auto_on_cpu_are_the_exact_reference(scheme, xdt):
    k = 333
    qw = lowbit.quantize(rand_weight((40, k)), scheme)
    bias = torch.randn(40, dtype=torch.float16)
    x = torch.randn(2, 3, k).to(xdt)
    want = (x.float() @ qw.dequantize(torch.float32).T + bias.float()).to(xdt)
    for backend in ("reference", "auto"):
        y = lowbit.matmul(x, qw, bias, backend=backend)
        assert y.dtype == xdt and y.shape == (2, 3, 40)
        assert torch.equal(y, want), backend


def test_quant_linear_and_quantize_model():
    model = nn.Sequential(nn.Linear(130, 64), nn.ReLU(), nn.Linear(64, 33, bias=False)).half()
    lowbit.quantize_model(model, "fp8_e4m3-g32-2:4", exclude=(), progress=False)
    first = model[0]
    assert isinstance(first, QuantLinear) and str(first.scheme) == "fp8_e4m3-g32-2:4"
    # buffers: 10-bit codes of 66 stored columns, scales of the 5 dense groups
    segments = lpack.SEGMENTS[10]
    assert [(tuple(b.shape), b.dtype) for b in (getattr(first, f"packed_{i}") for i in range(len(segments)))] == \
        [(lpack.segment_shape(64, 66, 10, s), lpack.segment_dtype(10, s)) for s in segments]
    assert tuple(first.scales.shape) == (5, 64)
    assert set(first.state_dict()) == {f"packed_{i}" for i in range(len(segments))} | {"scales", "bias"}
    x = torch.randn(4, 130, dtype=torch.float16)
    h = (x.float() @ first.qweight.dequantize(torch.float32).T + first.bias.float()).half()
    assert torch.equal(first(x), h)
    # an empty QuantLinear of a sparse scheme has the same buffers (what checkpoints load into)
    empty = QuantLinear(130, 64, "fp8_e4m3-g32-2:4", dtype=torch.float16)
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in first.state_dict().items()}


# -- checkpoints -------------------------------------------------------------------------------------------

def _sparse_mlp():
    model = nn.Sequential(nn.Linear(130, 64), nn.GELU(), nn.Linear(64, 48), nn.Linear(48, 16)).half()
    model[0] = QuantLinear.from_linear(model[0], "int4-g32-asym-2:4")
    model[2] = QuantLinear.from_linear(model[2], "int8-channel-2:4")
    model[3] = QuantLinear.from_linear(model[3], "int4-g32")  # a dense layer beside them
    return model.eval()


def _skeleton():
    return nn.Sequential(nn.Linear(130, 64), nn.GELU(), nn.Linear(64, 48), nn.Linear(48, 16)).half()


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = _sparse_mlp()
    lowbit.save_quantized(model, tmp_path / "ckpt")
    modules = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["0"]["scheme"] == "int4-g32-asym-2:4" and modules["0"]["shape"] == [64, 130]
    loaded = lowbit.load_quantized(tmp_path / "ckpt", model=_skeleton(), verify=True)
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    x = torch.randn(3, 130, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def _rewrite(path, key, tensor):
    """Store ``tensor`` as ``key`` in the shard ``path``, with its hash: a well-formed file."""
    from lowbit.io.checkpoint import SHA256_PREFIX, tensor_sha256

    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensor
    metadata[SHA256_PREFIX + key] = tensor_sha256(tensor)
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def test_checkpoint_with_a_repeated_position_is_refused(tmp_path):
    from lowbit.io.checkpoint import CheckpointError

    model = _sparse_mlp()
    lowbit.save_quantized(model, tmp_path / "ckpt")
    qw = model[2].qweight
    bits, stored = qw.scheme.code_bits, qw.scheme.stored_columns(qw.in_features)
    cases = lpack.unpack_codes(qw.packed, bits, stored, rows=qw.out_features)  # position bits as stored
    # Group 3 of row 5 (stored columns 6, 7): pair 0-1 "v0 v1" and pair 2-3 "v1 0" would keep three
    # entries; no pair of positions is stored so.
    cases[5, 6] = cases[5, 6] & ~3
    cases[5, 7] = (cases[5, 7] & ~3) | 1
    packed = lpack.pack_codes(cases, bits)
    for i, p in enumerate(packed):
        _rewrite(tmp_path / "ckpt" / "model.safetensors", f"2.packed_{i}", p)
    with pytest.raises(CheckpointError, match=r"model.safetensors: module '2': 2:4 positions of row 5, group 3"):
        lowbit.load_quantized(tmp_path / "ckpt", model=_skeleton(), verify=True)


def test_checkpoint_claiming_act_order_for_a_sparse_layer_is_refused(tmp_path):
    from lowbit.io.checkpoint import CheckpointError

    lowbit.save_quantized(_sparse_mlp(), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["modules"]["0"]["act_order"] = True
    config_path.write_text(json.dumps(config))
    _rewrite(tmp_path / "ckpt" / "model.safetensors", "0.perm", torch.arange(130))
    with pytest.raises(CheckpointError, match="module '0': perm: int4-g32-asym-2:4 is 2:4 sparse"):
        lowbit.load_quantized(tmp_path / "ckpt", model=_skeleton())


def test_transformers_quantizes_while_loading_and_reloads_bit_exact(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama.save_pretrained(tmp_path / "fp")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp",
                                             quantization_config=lowbit.LowbitConfig(scheme="int4-g32-2:4"))
    down = q.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and str(down.scheme) == "int4-g32-2:4"
    assert torch.equal(down.qweight.dequantize(), lowbit.quantize(tiny_llama.model.layers[1].mlp.down_proj.weight,
                                                                  "int4-g32-2:4").dequantize())
    q.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    a, b = q.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    tokens = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        assert torch.equal(q(tokens).logits, loaded(tokens).logits)


# -- what refuses sparse weights -----------------------------------------------------------------------

def test_vllm_plugin_refuses_sparse_schemes():
    from lowbit.integrations.vllm import check_dense, row_shard

    check_dense({"a": "int4-g128", "b": Scheme.parse("fp8_e4m3-channel")})
    with pytest.raises(ValueError, match=r"does not serve 2:4 sparse schemes .*: b \(int4-g128-2:4\), c"):
        check_dense({"a": "int4-g128", "b": "int4-g128-2:4", "c": "int8-channel-2:4"})
    names = {f"layer{i}": "int4-g128-2:4" for i in range(5)}
    with pytest.raises(ValueError, match="and 2 more"):
        check_dense(names)
    qw = lowbit.quantize(rand_weight((8, 256)), "int4-g128-2:4")
    with pytest.raises(ValueError, match="does not serve 2:4 sparse"):
        row_shard(qw, 0, 2)


def test_importers_refuse_sparse_compressed_tensors():
    from lowbit.io.importers import convert_tensors

    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"},
                                      "config_groups": {}}}
    with pytest.raises(ValueError, match="sparsity format 'sparse-24-bitmask' is not supported: lowbit imports dense"):
        convert_tensors(config, {})


# -- command line -------------------------------------------------------------------------------------

def test_cli_quantizes_2of4_with_rtn_and_gptq(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_data_eval import char_tokenizer
    from test_data_eval import tiny_llama as tiny_llama_for_cli

    from lowbit.cli import main

    source = tmp_path / "src"
    tiny_llama_for_cli().save_pretrained(source)
    char_tokenizer().save_pretrained(source)
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        extra = ["--calib-seqs", "4", "--calib-len", "32"] if method == "gptq" else []
        assert main(["quantize", str(source), "--scheme", "int4-g32-2:4", "--out", str(out), "--method", method,
                     *extra]) == 0
        capsys.readouterr()
        assert main(["info", str(out)]) == 0
        assert "int4-g32-2:4" in capsys.readouterr().out
        model = lowbit.load_quantized(out)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(nonzeros_per_group(m.qweight.dequantize(torch.float32)).max() <= 2 for m in layers)
    assert main(["quantize", str(source), "--scheme", "int4-g32-2:4", "--out", str(tmp_path / "act"),
                 "--method", "gptq", "--act-order"]) == 2
    assert "act_order cannot be combined" in capsys.readouterr().err
