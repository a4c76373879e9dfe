"""QuantLinear, quantize_model, lowbit.matmul and the lowbit::matmul custom op (CPU, reference path)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import QuantLinear, quantize_model
from lowbit.nn import quantized_linears
from lowbit.ops import BACKENDS

SCHEMES = ["int4-g32-asym", "int3-g64", "int8-channel", "fp6_e3m2-channel", "fp4_e2m1-g32-mx", "int4-g128",
           "int4-g128-2:4", "fp8_e4m3-channel-2:4"]
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_linear(in_f, out_f, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    if bias:
        nn.init.normal_(lin.bias, std=0.5)  # a bias big enough to see if it is dropped
    return lin.to(dtype)


def reference(x, qw, bias):
    """The documented reference: dequantize, multiply in float32, add bias, round to x's dtype."""
    y = x.float() @ qw.dequantize(torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# -- QuantLinear ----------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(5, 200), (2, 3, 200), (1, 200)], ids=["2d", "3d", "1row"])
@pytest.mark.parametrize("wdt,xdt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                     (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.float16)],
                         ids=["w32-x32", "w16-x16", "w16-x32", "wbf16-xbf16", "w32-x16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_matches_dequantized_weight(scheme, wdt, xdt, x_shape):
    lin = make_linear(200, 48, dtype=wdt, seed=1)
    m = QuantLinear.from_linear(lin, scheme)
    qw = m.qweight
    # from_linear is lowbit.quantize of the weight, and keeps the bias
    direct = lowbit.quantize(lin.weight.detach(), scheme)
    for name, t in direct.tensors().items():
        assert torch.equal(qw.tensors()[name], t), name
    assert torch.equal(m.bias, lin.bias.detach()) and m.bias.dtype == wdt
    x = torch.randn(x_shape).to(xdt)
    y = m(x)
    assert y.dtype == xdt and y.shape == (*x_shape[:-1], 48)
    eps = torch.finfo(xdt).eps  # one rounding of the output at most (float32 sums may be ordered differently)
    torch.testing.assert_close(y, reference(x, qw, lin.bias), rtol=eps, atol=eps)
    # and, at x's precision, x @ dequantize().T + bias
    w = qw.dequantize()
    want = (x.float() @ w.float().T + lin.bias.float()).to(xdt)
    tol = dict(rtol=2e-2, atol=2e-2) if torch.bfloat16 in (xdt, wdt) else \
        dict(rtol=2e-3, atol=2e-3) if torch.float16 in (xdt, wdt) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, want, **tol)
    # the same through lowbit.matmul
    assert torch.equal(lowbit.matmul(x, qw, m.bias), y)


def test_quant_linear_without_bias_and_against_nn_linear():
    lin = make_linear(96, 40, bias=False)
    m = QuantLinear.from_linear(lin, "int4-g32")
    assert m.bias is None
    ref = nn.Linear(96, 40, bias=False)
    with torch.no_grad():
        ref.weight.copy_(m.qweight.dequantize())
    x = torch.randn(4, 7, 96)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert "scheme=int4-g32" in repr(m) and "bias=False" in repr(m)


def test_quant_linear_buffers_and_state_dict():
    lin = make_linear(300, 24)
    m = QuantLinear.from_linear(lin, "int6-g64-asym")
    sd = m.state_dict()
    assert set(sd) == {"packed_0", "packed_1", "scales", "zeros", "bias"}
    fresh = QuantLinear(300, 24, "int6-g64-asym", bias=True, dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 300)
    assert torch.equal(fresh(x), m(x))


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), "int4-g32")


def test_backend_names():
    assert BACKENDS == ("auto", "triton", "reference")
    m = QuantLinear.from_linear(make_linear(64, 16), "int4-g32")
    x = torch.randn(2, 64)
    y_auto = m(x)
    assert m.set_backend("reference") is m and m.backend == "reference"
    assert torch.equal(m(x), y_auto)  # on CPU, auto is the reference
    with pytest.raises(ValueError, match="backend must be one of"):
        m.set_backend("cuda")
    assert torch.equal(lowbit.matmul(x, m.qweight, m.bias, backend="reference"), y_auto)
    assert torch.equal(lowbit.matmul(x, m.qweight, m.bias, backend="auto"), y_auto)


# -- lowbit.matmul input checks -------------------------------------------------------------------

@pytest.fixture(scope="module")
def qw_and_bias():
    lin = make_linear(64, 16)
    return lowbit.quantize(lin.weight.detach(), "int4-g32"), lin.bias.detach()


@pytest.mark.parametrize("x,bias,backend,exc,msg", [
    (torch.randn(2, 63), None, "auto", ValueError, r"\[\.\.\., 64\]"),
    (torch.randn(2, 65), None, "auto", ValueError, "in_features"),
    (torch.randn(64, 2), None, "auto", ValueError, "in_features"),
    (torch.tensor(1.0), None, "auto", ValueError, "in_features"),
    (torch.ones(2, 64, dtype=torch.int32), None, "auto", ValueError, "float16, bfloat16 or float32"),
    (torch.randn(2, 64, dtype=torch.float64), None, "auto", ValueError, "float16, bfloat16 or float32"),
    ([[0.0] * 64], None, "auto", TypeError, "torch.Tensor"),
    (torch.randn(2, 64), torch.zeros(15), "auto", ValueError, r"bias must be a tensor of shape \(16,\)"),
    (torch.randn(2, 64), torch.zeros(1, 16), "auto", ValueError, "bias"),
    (torch.randn(2, 64), [0.0] * 16, "auto", ValueError, "bias"),
    (torch.randn(2, 64), None, "cuda", ValueError, "backend must be one of"),
    (torch.randn(2, 64), None, "Reference", ValueError, "backend must be one of"),
    (torch.randn(2, 64, device="meta"), None, "auto", ValueError, "x is on meta"),
    (torch.randn(2, 64), torch.zeros(16, device="meta"), "auto", ValueError, "bias is on meta"),
], ids=["in-63", "in-65", "transposed", "scalar", "x-int32", "x-float64", "x-list", "bias-15", "bias-2d",
        "bias-list", "backend-cuda", "backend-case", "x-device", "bias-device"])
def test_matmul_input_checks(qw_and_bias, x, bias, backend, exc, msg):
    qw, _ = qw_and_bias
    with pytest.raises(exc, match=msg):
        lowbit.matmul(x, qw, bias, backend=backend)


def test_matmul_rejects_non_quantized_weight():
    with pytest.raises(TypeError, match="QuantizedWeight"):
        lowbit.matmul(torch.randn(2, 64), torch.randn(16, 64))


@pytest.mark.parametrize("xdt", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DT[d])
def test_matmul_output_dtype_follows_x(qw_and_bias, xdt):
    qw, b = qw_and_bias
    x = torch.randn(3, 2, 64).to(xdt)
    y = lowbit.matmul(x, qw, b)
    assert y.dtype == xdt and y.shape == (3, 2, 16)
    assert torch.equal(y, reference(x, qw, b))
    assert lowbit.matmul(torch.randn(0, 64), qw).shape == (0, 16)


@pytest.mark.skip(reason="a device mismatch between two real devices needs a GPU (meta-device cases above)")
def test_matmul_device_mismatch_cuda():
    pass


# -- quantize_model -------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.qq = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.q(x)) + self.qq(x)


class Toy(nn.Module):
    def __init__(self, d=32, n_layers=11, vocab=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.attn = nn.MultiheadAttention(d, 2)  # its out_proj is a Linear subclass it reads directly
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def linear_names(model, cls=nn.Linear):
    return {n for n, m in model.named_modules() if type(m) is cls}


def test_quantize_model_default_excludes_lm_head(capsys):
    torch.manual_seed(0)
    model = Toy()
    before = linear_names(model)
    assert len(before) == 11 * 4 + 1
    originals = {n: copy.deepcopy(m) for n, m in model.named_modules() if n in before}
    assert [n for n, _ in quantized_linears(model)] == sorted(before - {"lm_head"}, key=list(originals).index)
    out = quantize_model(model, "int4-g32", progress=False)
    assert out is model
    assert capsys.readouterr().err == ""  # no progress bar
    assert linear_names(model) == {"lm_head"}
    assert linear_names(model, QuantLinear) == before - {"lm_head"}
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for name in before - {"lm_head"}:
        q, lin = model.get_submodule(name), originals[name]
        assert q.scheme == lowbit.Scheme.parse("int4-g32")
        want = lowbit.quantize(lin.weight.detach(), "int4-g32")
        assert torch.equal(q.qweight.dequantize(), want.dequantize()), name
        assert (q.bias is None) == (lin.bias is None)
        if lin.bias is not None:
            assert torch.equal(q.bias, lin.bias)


def test_quantize_model_output_matches_dequantized_model():
    torch.manual_seed(1)
    model = Toy(n_layers=2)
    ref = copy.deepcopy(model)
    quantize_model(model, "fp6_e3m2-channel", progress=False)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                ref.get_submodule(name).weight.copy_(m.qweight.dequantize())
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)


def test_quantize_model_exclude_prefixes_and_names():
    model = Toy()
    quantize_model(model, "int8-channel", exclude=("layers.1", "q", "mlp.2"), progress=False)
    kept = linear_names(model)
    want = {f"layers.1.{s}" for s in ("q", "qq", "mlp.0", "mlp.2")}  # prefix
    want |= {f"layers.{i}.q" for i in range(11)}  # last component
    want |= {f"layers.{i}.mlp.2" for i in range(11)}  # last components
    assert kept == want
    # 'layers.1' is not a prefix of 'layers.10', 'q' does not match 'qq'; lm_head is no longer excluded
    assert isinstance(model.layers[10].mlp[0], QuantLinear)
    assert isinstance(model.layers[0].qq, QuantLinear)
    assert isinstance(model.lm_head, QuantLinear)


def test_quantize_model_nothing_to_do_and_progress_bar(capsys):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    quantize_model(model, "int4-g16", exclude=("0",), progress=False)
    assert type(model[0]) is nn.Linear
    quantize_model(model, "int4-g16", exclude=(), progress=True)
    assert isinstance(model[0], QuantLinear)
    assert "quantize int4-g16" in capsys.readouterr().err


def test_quantize_model_rejects_bad_scheme():
    with pytest.raises(ValueError, match="power of two"):
        quantize_model(nn.Sequential(nn.Linear(16, 16)), "int4-g24", progress=False)


# -- torch.compile and opcheck --------------------------------------------------------------------

def test_torch_compile_fullgraph_traces_quant_linear():
    torch._dynamo.reset()
    model = nn.Sequential(QuantLinear.from_linear(make_linear(128, 64, seed=2), "int4-g32-asym"), nn.GELU(),
                          QuantLinear.from_linear(make_linear(64, 16, seed=3), "fp6_e3m2-channel"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y = compiled(x)
        assert torch.equal(y, model(x))
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(t in (torch.ops.lowbit.matmul, torch.ops.lowbit.matmul.default) for t in ops) == 2, ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: DT[d])
def test_torch_compile_aot_eager_matches_eager(dtype):
    torch._dynamo.reset()
    m = QuantLinear.from_linear(make_linear(200, 32, seed=4, dtype=dtype), "int3-g64")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for shape in [(4, 200), (1, 7, 200)]:
            x = torch.randn(shape).to(dtype)
            y = compiled(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], 32)
            assert torch.equal(y, m(x))


def _op_args(scheme, perm, wdt, xdt, x_shape):
    lin = make_linear(160, 24, seed=5, dtype=wdt)
    qw = lowbit.quantize(lin.weight.detach(), scheme)
    p = torch.randperm(160) if perm else None
    return (torch.randn(x_shape).to(xdt), list(qw.packed), qw.scales, qw.zeros, p, lin.bias.detach(), str(qw.scheme),
            24, 160, DT[wdt].replace("fp", "float").replace("bf16", "bfloat16"), "reference")


@pytest.mark.parametrize("scheme,perm,wdt,xdt,x_shape", [
    ("int4-g32-asym", False, torch.float32, torch.float32, (3, 160)),
    ("int7-g64", True, torch.float16, torch.float16, (2, 3, 160)),
    ("fp4_e2m1-g32-mx", False, torch.bfloat16, torch.bfloat16, (1, 160)),
    ("fp6_e3m2-channel", False, torch.float16, torch.float32, (4, 160)),
    ("int4-g32-asym-2:4", False, torch.float16, torch.float16, (3, 160)),
    ("int8-channel-2:4", False, torch.bfloat16, torch.float32, (2, 160)),
], ids=["int4-asym-fp32", "int7-perm-fp16-3d", "fp4-mx-bf16", "fp6-w16-x32", "int4-asym-2of4-fp16",
        "int8-2of4-wbf16-x32"])
def test_opcheck(scheme, perm, wdt, xdt, x_shape):
    args = _op_args(scheme, perm, wdt, xdt, x_shape)
    assert args[9] == str(wdt).removeprefix("torch.")
    torch.library.opcheck(torch.ops.lowbit.matmul.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


def test_plain_eager_calls_skip_the_op_dispatch(monkeypatch):
    """Plain eager calls run the op's implementation directly (the dispatch cost ~110 us a call on a GPU
    host); meta tensors, tensors autograd follows (x or the bias), functorch transforms and dispatch
    modes still meet the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lowbit import ops

    direct = []
    impl = ops._matmul_impl
    monkeypatch.setattr(ops, "_matmul_impl", lambda *a: direct.append(1) or impl(*a))
    layer = QuantLinear.from_linear(make_linear(64, 24, seed=6), "int4-g32")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.set_backend("reference")(x)) and len(direct) == 2
        assert torch.equal(lowbit.matmul(x, layer.qweight, layer.bias), layer(x)) and len(direct) == 4

        class Seen(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(func)
                return func(*args, **(kwargs or {}))

        seen = []
        with Seen():
            layer(x)
        assert torch.ops.lowbit.matmul.default in seen and len(direct) == 4
        meta = layer(torch.empty(5, 64, device="meta"))
    assert meta.shape == (5, 24) and meta.is_meta and len(direct) == 4
    y = layer(x.requires_grad_())
    assert len(direct) == 4 and torch.allclose(y.detach(), layer(x.detach()).detach())
    x.requires_grad_(False)
    layer.bias.requires_grad_(True)
    layer(x)  # through the op: the bias needs a gradient
    assert len(direct) == 5  # (the 5th: layer(x.detach()) in the comparison above)
    layer.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="lowbit::matmul"):  # vmap meets the op, which has no batching rule
        torch.func.vmap(layer)(x[None])
    assert len(direct) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_an_input_of_another_width(backend):
    """QuantLinear's forward skips lowbit.matmul's checks; its op still names the expected width (the
    kernels take K from x: a 2-D input of another width would read past the weight)."""
    layer = QuantLinear.from_linear(make_linear(64, 24, dtype=torch.float16, seed=9), "int4-g32").set_backend(backend)
    for shape in ((3, 80), (3, 32), (2, 3, 80)):
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\] \(in_features\)"):
            layer(torch.randn(*shape, dtype=torch.float16))


# ------------------------------------------------------------------------------ fused projections
def _tiny_llama(seed=0, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa", attention_bias=bias,
                         mlp_bias=bias)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("scheme,bias", [(None, False), (None, True), ("int4-g32", True), ("int8-channel-asym", False)],
                         ids=["dense", "dense-bias", "int4-g32-bias", "int8-asym"])
def test_fuse_projections_keeps_the_model_output(scheme, bias):
    """q/k/v and gate/up as one linear each: transformers' own forward gives the same logits (the
    fused codes are the parts' codes), greedy generation the same tokens, and it traces whole."""
    model = _tiny_llama(bias=bias)
    if scheme:
        quantize_model(model, scheme, progress=False)
    tokens = torch.randint(0, 128, (2, 9))
    with torch.inference_mode():
        expected = model(tokens).logits
        generated = model.generate(tokens, max_new_tokens=4, do_sample=False)
        assert lowbit.fuse_projections(model) == 2 * 2  # two groups in each of two layers
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert type(attn.fused_projection) is (QuantLinear if scheme else nn.Linear)
        assert attn.fused_projection.out_features == 64 + 2 * 32 and mlp.fused_projection.out_features == 2 * 96
        assert not any(isinstance(getattr(attn, n), (nn.Linear, QuantLinear)) for n in ("q_proj", "k_proj", "v_proj"))
        assert torch.allclose(model(tokens).logits, expected, atol=1e-5)
        assert torch.equal(model.generate(tokens, max_new_tokens=4, do_sample=False), generated)
        traced = torch.compile(model.forward, backend="eager", fullgraph=True)
        assert torch.allclose(traced(input_ids=tokens).logits, expected, atol=1e-5)
    assert lowbit.fuse_projections(model) == 0  # already fused
    with pytest.raises(ValueError, match="save it before fusing"):
        lowbit.save_quantized(model, "unused-dir")


def test_fused_module_input_by_position_or_name():
    from lowbit.nn import check_unfused

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = make_linear(8, 16, bias=False), make_linear(8, 16, bias=False, seed=1)

        def forward(self, h):
            return self.gate_proj(h) * self.up_proj(h)

    mlp, h = Mlp(), torch.randn(3, 8)
    expected = mlp(h)
    check_unfused(mlp)
    assert lowbit.fuse_projections(mlp) == 1
    with pytest.raises(ValueError, match="save it before fusing"):
        check_unfused(mlp)
    assert torch.allclose(mlp(h), expected) and torch.allclose(mlp(h=h), expected)
    with pytest.raises(TypeError, match="its input 'h' is missing"):
        mlp()


def test_fuse_projections_rejects_what_is_not_a_model_or_a_group():
    with pytest.raises(TypeError, match="takes an nn.Module, got dict"):
        lowbit.fuse_projections({})
    for groups in (("q_proj", "k_proj"), [("q_proj",)], [("q_proj", 3)]):
        with pytest.raises(ValueError, match="groups must be tuples of at least two attribute names"):
            lowbit.fuse_projections(_tiny_llama(), groups)


def test_fuse_projections_leaves_cross_attention_alone():
    class CrossAttention(nn.Module):  # k/v read the encoder's states, q the decoder's
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (make_linear(8, 8, seed=i) for i in range(3))

        def forward(self, hidden_states, key_value_states=None):
            kv = hidden_states if key_value_states is None else key_value_states
            return self.q_proj(hidden_states) + self.k_proj(kv) * self.v_proj(kv)

    attn = CrossAttention()
    assert lowbit.fuse_projections(attn) == 0 and isinstance(attn.k_proj, nn.Linear)


def test_fuse_projections_checks_every_group_before_changing_any():
    model = _tiny_llama()
    quantize_model(model, "int4-g32", progress=False)
    layer1 = model.model.layers[1].mlp
    layer1.up_proj = QuantLinear.from_linear(make_linear(64, 96, bias=False), "int8-channel")  # a second scheme
    with pytest.raises(ValueError, match=r"model.layers.1.mlp: gate_proj, up_proj do not fuse: cannot fuse .*scheme"):
        lowbit.fuse_projections(model)
    assert not any(hasattr(m, "fused_projection") for m in model.modules())  # nothing changed
    layer1.up_proj = model.model.layers[0].mlp.up_proj
    layer1.up_proj.set_backend("reference")
    with pytest.raises(ValueError, match="their backends differ"):
        lowbit.fuse_projections(model)
    both = model.model.layers[0].mlp
    both.q_proj, both.k_proj, both.v_proj = (QuantLinear.from_linear(make_linear(64, 32, bias=False), "int4-g32")
                                             for _ in range(3))
    with pytest.raises(ValueError, match="model.layers.0.mlp: holds more than one group"):
        lowbit.fuse_projections(model)
    model = _tiny_llama()
    model.model.layers[0].self_attn.k_proj = make_linear(64, 32)  # a bias the others lack
    with pytest.raises(ValueError, match="only some of them have a bias"):
        lowbit.fuse_projections(model)
