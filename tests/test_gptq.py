import copy

import pytest
import torch

import lowbit
from lowbit import formats
from lowbit.quantize.gptq import HessianAccumulator, quantize_gptq, quantize_model_gptq
from lowbit.quantize.rtn import decode_codes, expand_groups


def correlated_inputs(n: int, k: int, column_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Calibration activations whose columns are correlated (X = Z @ A), as real layer inputs are."""
    x = torch.randn(n, k) @ (torch.randn(k, k) / k ** 0.5)
    return x if column_scales is None else x * column_scales


def output_error(x: torch.Tensor, w: torch.Tensor, qw) -> float:
    return ((x @ w.T - x @ qw.dequantize(torch.float32).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g16-asym", "fp4_e2m1-g32", "fp6_e3m2-channel", "int8-channel"])
def test_gptq_beats_rtn_and_clip_search_on_correlated_inputs(scheme):
    w, x = torch.randn(96, 256), correlated_inputs(1024, 256)
    gptq = output_error(x, w, quantize_gptq(w, scheme, x))
    rtn = output_error(x, w, lowbit.quantize(w, scheme))
    clipped = output_error(x, w, lowbit.quantize(w, scheme, clip_search=True))
    assert gptq < 0.9 * min(rtn, clipped), (gptq, rtn, clipped)


def test_quantize_forwards_gptq_options():
    w, x = torch.randn(32, 64), correlated_inputs(256, 64)
    via_quantize = lowbit.quantize(w, "int4-g16", method="gptq", inputs=x, act_order=True, block_size=32)
    direct = quantize_gptq(w, "int4-g16", x, act_order=True, block_size=32)
    assert torch.equal(via_quantize.codes(), direct.codes()) and torch.equal(via_quantize.perm, direct.perm)


def test_act_order_permutation_round_trips():
    k = 128
    scales = torch.logspace(-2, 1, k)[torch.randperm(k)]  # very unequal column magnitudes
    w, x = torch.randn(64, k), correlated_inputs(1024, k, scales)
    qw = quantize_gptq(w, "int4-g32", x, act_order=True)
    assert qw.perm is not None and qw.perm.dtype == torch.int64
    assert torch.equal(torch.sort(qw.perm).values, torch.arange(k))
    assert not torch.equal(qw.perm, torch.arange(k))
    # The largest input columns come first.
    diag = (x * x).sum(0)
    assert torch.equal(qw.perm[:8], torch.argsort(diag, descending=True)[:8])
    # dequantize() is in the original column order: its outputs match, those of the stored order do not.
    deq = qw.dequantize(torch.float32)
    relative = lambda m: ((x @ m.T - x @ w.T).norm() / (x @ w.T).norm()).item()  # noqa: E731
    assert relative(deq) < 0.1 and relative(deq[:, qw.perm]) > 0.5
    y = torch.randn(5, k)
    torch.testing.assert_close(lowbit.matmul(y, qw), y @ deq.T, rtol=1e-5, atol=1e-5)
    assert output_error(x, w, qw) <= output_error(x, w, quantize_gptq(w, "int4-g32", x))


@pytest.mark.parametrize("name", formats.names())
def test_every_format_runs_and_stays_on_its_grid(name):
    fmt = formats.get(name)
    scheme = lowbit.Scheme.parse(f"{name}-g16" + ("-asym" if name in ("int3", "int5") else ""))
    w, x = torch.randn(8, 40), correlated_inputs(128, 40)
    qw = quantize_gptq(w, scheme, x, act_order=name.endswith("m1"))
    codes = qw.codes()
    assert int(codes.max()) < fmt.num_codes
    assert not torch.isnan(fmt.decode(codes)).any()  # e4m3's NaN codes are never produced
    k = qw.in_features
    scales = expand_groups(qw.scale_values().T, scheme, k)
    zeros = None if qw.zeros is None else expand_groups(qw.zeros.T, scheme, k)
    on_grid = decode_codes(codes, scheme, scales, zeros)
    if qw.perm is not None:
        on_grid = torch.empty_like(on_grid).index_copy_(1, qw.perm, on_grid)
    assert torch.equal(qw.dequantize(torch.float32), on_grid)
    assert output_error(x, w, qw) < 1.0


def test_mx_scales_and_float16_weights():
    w, x = torch.randn(32, 96, dtype=torch.float16), correlated_inputs(512, 96)
    qw = quantize_gptq(w, "fp4_e2m1-g32-mx", x.half())
    assert qw.scales.dtype == torch.uint8 and qw.dtype == torch.float16
    assert output_error(x, w.float(), qw) < output_error(x, w.float(), lowbit.quantize(w, "fp4_e2m1-g32-mx"))


def test_deterministic():
    w, x = torch.randn(48, 96), correlated_inputs(256, 96)
    runs = [quantize_gptq(w, "int4-g32-asym", x, act_order=True, clip_search=True) for _ in range(2)]
    a, b = (r.tensors() for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_groups_not_dividing_in_features_and_blocks_not_aligned_to_groups():
    w, x = torch.randn(40, 72), correlated_inputs(512, 72)
    qw = quantize_gptq(w, "int4-g32", x)
    assert tuple(qw.scales.shape) == (3, 40)
    assert output_error(x, w, qw) < output_error(x, w, lowbit.quantize(w, "int4-g32"))
    # Lazy batch updates are exact algebra: any block size gives the same result up to float rounding.
    small_blocks = quantize_gptq(w, "int4-g32", x, block_size=20)
    assert (small_blocks.codes() == qw.codes()).float().mean() > 0.98
    assert output_error(x, w, small_blocks) == pytest.approx(output_error(x, w, qw), rel=0.05)


def test_hessian_accumulated_over_batches_matches_inputs():
    w, x = torch.randn(16, 64), correlated_inputs(300, 64)
    acc = HessianAccumulator(64)
    for part in x.split(64):
        acc.add(part)
    torch.testing.assert_close(acc.hessian, 2 / 300 * x.T @ x, rtol=1e-4, atol=1e-5)
    from_h = quantize_gptq(w, "int4-g16", hessian=acc.hessian)
    from_x = quantize_gptq(w, "int4-g16", x)
    assert (from_h.codes() == from_x.codes()).float().mean() > 0.98


def test_dead_input_columns():
    w, x = torch.randn(16, 64), correlated_inputs(256, 64)
    x[:, 5] = 0
    qw = quantize_gptq(w, "int4-g16", x, act_order=True)
    deq = qw.dequantize(torch.float32)
    assert torch.isfinite(deq).all() and torch.all(deq[:, 5] == 0)
    assert qw.perm[-1] == 5  # an unused input goes last


def test_bad_inputs_raise_value_error_naming_what_was_expected():
    w, x = torch.randn(16, 64), torch.randn(128, 64)
    with pytest.raises(ValueError, match=r"inputs must have shape \[n, 64\]"):
        quantize_gptq(w, "int4-g16", torch.randn(128, 63))
    with pytest.raises(ValueError, match=r"inputs must have shape \[n, 64\]"):
        quantize_gptq(w, "int4-g16", torch.randn(64))
    with pytest.raises(ValueError, match="inputs must be a floating-point tensor"):
        quantize_gptq(w, "int4-g16", torch.ones(128, 64, dtype=torch.int64))
    nan_x = x.clone()
    nan_x[3, 7] = float("nan")
    with pytest.raises(ValueError, match="inputs have inf or NaN"):
        quantize_gptq(w, "int4-g16", nan_x)
    with pytest.raises(ValueError, match=r"hessian must have shape \[64, 64\]"):
        quantize_gptq(w, "int4-g16", hessian=torch.eye(32))
    with pytest.raises(ValueError, match="hessian has inf or NaN"):
        quantize_gptq(w, "int4-g16", hessian=torch.full((64, 64), float("nan")))
    with pytest.raises(ValueError, match="exactly one of inputs"):
        quantize_gptq(w, "int4-g16", x, hessian=torch.eye(64))
    with pytest.raises(ValueError, match="exactly one of inputs"):
        quantize_gptq(w, "int4-g16")
    with pytest.raises(ValueError, match="not positive definite"):
        quantize_gptq(w, "int4-g16", hessian=-torch.eye(64))
    with pytest.raises(ValueError, match="damp must be a non-negative number"):
        quantize_gptq(w, "int4-g16", x, damp=-0.1)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        quantize_gptq(w, "int4-g16", x, block_size=0)
    nan_w = w.clone()
    nan_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight has inf or NaN"):
        quantize_gptq(nan_w, "int4-g16", x)


def logits_error(model, reference, ids) -> float:
    with torch.no_grad():
        want = reference(ids).logits
        return ((model(ids).logits - want).norm() / want.norm()).item()


@pytest.mark.parametrize("scheme, act_order", [("int8-channel", False), ("int4-g32", True)])
def test_quantize_model_gptq_tiny_llama(tiny_llama, scheme, act_order):
    calibration = torch.randint(0, 128, (12, 32))
    model = quantize_model_gptq(copy.deepcopy(tiny_llama), scheme, calibration, act_order=act_order,
                                progress=False, batch_size=5)
    linears = {name: type(m) for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, lowbit.QuantLinear))}
    assert linears.pop("lm_head") is torch.nn.Linear
    assert len(linears) == 14 and set(linears.values()) == {lowbit.QuantLinear}
    assert all((m.perm is not None) == act_order for m in model.modules() if isinstance(m, lowbit.QuantLinear))
    ids = torch.randint(0, 128, (4, 32))
    error = logits_error(model, tiny_llama, ids)
    rtn = lowbit.quantize_model(copy.deepcopy(tiny_llama), scheme, progress=False)
    assert error < (0.01 if scheme == "int8-channel" else 0.1)
    assert error < logits_error(rtn, tiny_llama, ids)


def test_quantize_model_gptq_stores_the_dtype_asked_for(tiny_llama):
    calibration = torch.randint(0, 128, (4, 32))
    model = quantize_model_gptq(copy.deepcopy(tiny_llama), "int4-g32", calibration, dtype=torch.float16,
                                progress=False)
    layers = [m for m in model.modules() if isinstance(m, lowbit.QuantLinear)]
    assert layers and all(m.weight_dtype == torch.float16 and m.scales.dtype == torch.float16 for m in layers)
    # As RTN of the float16 weights stores them: the same bits per weight.
    rtn = lowbit.quantize_model(copy.deepcopy(tiny_llama).half(), "int4-g32", progress=False)
    rtn_bits = [m.qweight.bits_per_weight for m in rtn.modules() if isinstance(m, lowbit.QuantLinear)]
    assert [m.qweight.bits_per_weight for m in layers] == rtn_bits
    default = quantize_model_gptq(copy.deepcopy(tiny_llama), "int4-g32", calibration, progress=False)
    assert all(m.scales.dtype == torch.float32 for m in default.modules() if isinstance(m, lowbit.QuantLinear))


def test_quantize_model_gptq_bad_arguments(tiny_llama):
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(ValueError, match=r"calibration must be a LongTensor \[n_seq, seq_len\]"):
        quantize_model_gptq(copy.deepcopy(tiny_llama), "int4-g32", ids.float(), progress=False)
    with pytest.raises(ValueError, match="exclude"):
        quantize_model_gptq(copy.deepcopy(tiny_llama), "int4-g32", ids, exclude=(), progress=False)
    with pytest.raises(ValueError, match="dtype must be None, torch.float16"):
        quantize_model_gptq(copy.deepcopy(tiny_llama), "int4-g32", ids, dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="model.model.layers"):
        quantize_model_gptq(torch.nn.Linear(4, 4), "int4-g32", ids, progress=False)
