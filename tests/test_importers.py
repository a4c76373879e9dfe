"""GPTQ, AWQ and compressed-tensors checkpoints into lowbit, without re-quantizing.

Each test builds a checkpoint as the source format's packer does (layouts in
shared/notes/marlin.md section 5), and checks that lowbit's dequantized weight equals, bit for bit
in float32, the source format's own dequantization written here from the same layout.
"""

import json
import os
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit.io.importers import convert, convert_tensors, detect_format, load_foreign

SNIPPET = Path(__file__).parents[1] / "docs" / "snippets" / "import_checkpoint.py"
N, K = 48, 256  # N a multiple of 8 (AWQ, packed zero points), K of every group size used
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble slot i holds column 8c + AWQ_PACK_ORDER[i]


# -- the formats' packers (test side) -----------------------------------------------------------

def pack_last_dim(values: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 words along the last dim: slot i of word c (bits i*b..) holds value c*per + order[i]."""
    per = 32 // bits
    v = values.to(torch.int64) & ((1 << bits) - 1)
    pad = (-v.shape[-1]) % per
    v = torch.nn.functional.pad(v, (0, pad))
    v = v.view(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., order]
    words = (v << (torch.arange(per) * bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_field(words: torch.Tensor, index_of_word: torch.Tensor, slot: torch.Tensor, bits: int) -> torch.Tensor:
    """Value in ``slot`` of ``words[index]`` (the formats' dequantization, one element at a time)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return (w[index_of_word] >> (slot * bits)) & ((1 << bits) - 1)


def random_layer(bits, groups, asym, dtype=torch.float16, n=N, k=K):
    codes = torch.randint(0, 2**bits, (k, n))  # [K, N] as GPTQ/AWQ hold them
    scales = (torch.rand(groups, n) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 2**bits, (groups, n)) if asym else torch.full((groups, n), 2 ** (bits - 1))
    return codes, scales, zeros


def lowbit_weight(config, tensors, name="layer"):
    out, modules = convert_tensors(config, tensors)
    prefix = name + "."
    qw = lowbit.QuantizedWeight.from_tensors(
        {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix) and k != prefix + "bias"},
        {**modules[name], "layout": lowbit.pack.LAYOUT})
    return qw, out


# -- GPTQ --------------------------------------------------------------------------------------

def gptq_layer(bits, group_size, asym, fmt="gptq", g_idx=None, name="layer", n=N, k=K, bias=True):
    groups = 1 if group_size == -1 else k // group_size
    codes, scales, zeros = random_layer(bits, groups, asym, n=n, k=k)
    if asym:
        zeros[0, :3] = torch.tensor([0, 1, 2**bits - 1])  # extremes; v1 stores zero 0 as -1 (all ones)
    stored_zeros = zeros - 1 if fmt == "gptq" else zeros
    if g_idx is None:
        g_idx = torch.arange(k) // (k if group_size == -1 else group_size)
    tensors = {f"{name}.qweight": pack_last_dim(codes.T, bits).T.contiguous(),
               f"{name}.qzeros": pack_last_dim(stored_zeros, bits), f"{name}.scales": scales,
               f"{name}.g_idx": g_idx.to(torch.int32)}
    if bias:
        tensors[f"{name}.bias"] = torch.randn(n).half()
    return tensors


def gptq_config(bits, group_size, asym, fmt="gptq"):
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": not asym,
            "checkpoint_format": fmt}


def gptq_checkpoint(bits, group_size, asym, fmt="gptq", g_idx=None):
    return ({"quantization_config": gptq_config(bits, group_size, asym, fmt), "dtype": "float16"},
            gptq_layer(bits, group_size, asym, fmt, g_idx))


def gptq_dequantize(tensors, bits, fmt, name="layer"):
    """AutoGPTQ's dequantization: w = s[g_idx] * (q - (qz + 1)) (v1), without the +1 in gptq_v2."""
    per = 32 // bits
    qweight, qzeros, scales, g_idx = (tensors[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx"))
    k, n = torch.arange(qweight.shape[0] * per)[:, None], torch.arange(qweight.shape[1])[None, :]
    q = unpack_field(qweight, (k // per, n), k % per, bits)
    g = g_idx.long()[:, None]
    z = unpack_field(qzeros, (g, n // per), n % per, bits) + (1 if fmt == "gptq" else 0)
    return (scales.float()[g, n] * (q - z).float()).T


@pytest.mark.parametrize("bits,group_size,asym,fmt", [
    (4, 32, False, "gptq"), (4, 32, True, "gptq"), (4, 128, True, "gptq_v2"), (8, -1, True, "gptq_v2"),
    (2, 16, True, "gptq_v2"), (8, 64, False, "gptq"),
], ids=lambda v: str(v))
def test_gptq_dequantizes_identically(bits, group_size, asym, fmt):
    config, tensors = gptq_checkpoint(bits, group_size, asym, fmt)
    qw, out = lowbit_weight(config, dict(tensors))
    assert torch.equal(qw.dequantize(torch.float32), gptq_dequantize(tensors, bits, fmt))
    assert qw.scheme.symmetric == (not asym)
    assert qw.scheme.group_size == group_size and qw.scheme.bits == bits
    assert torch.equal(out["layer.bias"], tensors["layer.bias"])
    assert not any(k.endswith(("qweight", "qzeros", "g_idx")) for k in out)


def test_gptq_v1_zero_point_zero_reads_as_two_to_the_bits():
    """v1 stores zero - 1, so a zero point of 0 comes back as 16 at 4 bits: as AutoGPTQ computes it."""
    config, tensors = gptq_checkpoint(4, 32, True, "gptq")
    qw, _ = lowbit_weight(config, dict(tensors))
    assert int(qw.zeros[0, 0]) == 16


def test_gptq_v1_8bit_zero_point_zero_is_rejected():
    config, tensors = gptq_checkpoint(8, 32, True, "gptq")
    with pytest.raises(ValueError, match="zero point 256"):
        convert_tensors(config, tensors)


def test_gptq_act_order_becomes_perm():
    group_size = 32
    order = torch.randperm(K)
    g_idx = torch.empty(K, dtype=torch.int64)
    g_idx[order] = torch.arange(K) // group_size  # GPTQ quantizes columns in `order`, groups as it goes
    config, tensors = gptq_checkpoint(4, group_size, True, "gptq", g_idx=g_idx)
    config["quantization_config"]["desc_act"] = True
    qw, out = lowbit_weight(config, dict(tensors))
    assert qw.perm is not None and "layer.perm" in out
    assert torch.equal(qw.dequantize(torch.float32), gptq_dequantize(tensors, 4, "gptq"))
    x = torch.randn(3, K)
    assert torch.allclose(lowbit.matmul(x, qw), x @ gptq_dequantize(tensors, 4, "gptq").T, atol=1e-4)


def test_gptq_g_idx_that_is_not_whole_groups_is_rejected():
    g_idx = torch.arange(K) // 32
    g_idx[0] = 1  # group 0 now has 31 columns and group 1 has 33
    config, tensors = gptq_checkpoint(4, 32, False, "gptq", g_idx=g_idx)
    with pytest.raises(ValueError, match="g_idx"):
        convert_tensors(config, tensors)


@pytest.mark.parametrize("change,message", [
    ({"bits": 3}, "3-bit packing"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"group_size": 100}, "group size 100"),
])
def test_gptq_unsupported_variants_are_named(change, message):
    config, tensors = gptq_checkpoint(4, 32, False)
    config["quantization_config"].update(change)
    with pytest.raises(ValueError, match=message):
        convert_tensors(config, tensors)


# -- AWQ ---------------------------------------------------------------------------------------

def awq_checkpoint(group_size=32):
    codes, scales, zeros = random_layer(4, K // group_size, asym=True)
    tensors = {"layer.qweight": pack_last_dim(codes, 4, AWQ_PACK_ORDER),
               "layer.qzeros": pack_last_dim(zeros, 4, AWQ_PACK_ORDER), "layer.scales": scales}
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return {"quantization_config": qc, "dtype": "float16"}, tensors


def awq_dequantize(tensors, group_size):
    """AutoAWQ's dequantization: (q - z) * s, nibbles un-interleaved with [0, 4, 1, 5, 2, 6, 3, 7]."""
    slot_of_column = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    k, n = torch.arange(K)[:, None], torch.arange(N)[None, :]
    q = unpack_field(tensors["layer.qweight"], (k, n // 8), slot_of_column[n % 8], 4)
    g = k // group_size
    z = unpack_field(tensors["layer.qzeros"], (g, n // 8), slot_of_column[n % 8], 4)
    return (tensors["layer.scales"].float()[g, n] * (q - z).float()).T


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_gemm_dequantizes_identically(group_size):
    config, tensors = awq_checkpoint(group_size)
    qw, _ = lowbit_weight(config, dict(tensors))
    assert torch.equal(qw.dequantize(torch.float32), awq_dequantize(tensors, group_size))
    assert str(qw.scheme) == f"int4-g{group_size}-asym"


@pytest.mark.parametrize("change,message", [
    ({"version": "gemv"}, "AWQ version 'gemv'"), ({"zero_point": False}, "zero_point: false"),
    ({"bits": 8}, "AWQ 8-bit"),
])
def test_awq_unsupported_variants_are_named(change, message):
    config, tensors = awq_checkpoint()
    config["quantization_config"].update(change)
    with pytest.raises(ValueError, match=message):
        convert_tensors(config, tensors)


# -- compressed-tensors pack-quantized ---------------------------------------------------------

def ct_checkpoint(bits, strategy, symmetric, group_size=32, actorder=False, dtype=torch.bfloat16):
    groups = 1 if strategy == "channel" else K // group_size
    codes, scales, zeros = random_layer(bits, groups, not symmetric, dtype)
    tensors = {"layer.weight_packed": pack_last_dim(codes.T, bits),  # stored as v + 2^(b-1): the codes
               "layer.weight_scale": scales.T.contiguous(), "layer.weight_shape": torch.tensor([N, K])}
    if not symmetric:  # signed zero points, stored + 2^(b-1) like the codes, packed along dim 0 (N)
        tensors["layer.weight_zero_point"] = pack_last_dim(zeros, bits).T.contiguous()
    if actorder:
        order = torch.randperm(K)
        g_idx = torch.empty(K, dtype=torch.int64)
        g_idx[order] = torch.arange(K) // group_size
        tensors["layer.weight_g_idx"] = g_idx.to(torch.int32)
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group_size if strategy == "group" else None, "actorder": "group" if actorder else None}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
          "ignore": ["lm_head"], "quantization_status": "compressed"}
    return {"quantization_config": qc, "dtype": "bfloat16"}, tensors


def ct_dequantize(tensors, bits, group_size, symmetric):
    """compressed-tensors' dequantization: (q - zp) * scale, q and zp signed (stored - 2^(b-1))."""
    per, offset = 32 // bits, 2 ** (bits - 1)
    n, k = torch.arange(N)[:, None], torch.arange(K)[None, :]
    q = unpack_field(tensors["layer.weight_packed"], (n, k // per), k % per, bits) - offset
    g = tensors["layer.weight_g_idx"].long()[None, :] if "layer.weight_g_idx" in tensors else k // group_size
    zp = 0 if symmetric else unpack_field(tensors["layer.weight_zero_point"], (n // per, g), n % per, bits) - offset
    return tensors["layer.weight_scale"].float()[n, g] * (q - zp).float()


@pytest.mark.parametrize("bits,strategy,symmetric,actorder", [
    (4, "group", True, False), (4, "group", False, False), (8, "channel", False, False), (8, "channel", True, False),
    (4, "group", True, True),
], ids=lambda v: str(v))
def test_compressed_tensors_dequantizes_identically(bits, strategy, symmetric, actorder):
    config, tensors = ct_checkpoint(bits, strategy, symmetric, actorder=actorder)
    qw, out = lowbit_weight(config, dict(tensors))
    group_size = K if strategy == "channel" else 32
    assert torch.equal(qw.dequantize(torch.float32), ct_dequantize(tensors, bits, group_size, symmetric))
    assert qw.scheme.symmetric == symmetric and (qw.perm is not None) == actorder
    assert not any(k.startswith("layer.weight") for k in out)


@pytest.mark.parametrize("change,message", [
    ({"format": "int-quantized"}, "format 'int-quantized'"),
    ({"format": "marlin-24"}, "format 'marlin-24'"),
    ({"strategy": "tensor"}, "strategy 'tensor'"),
    ({"type": "float"}, "type 'float'"),
    ({"input_activations": {"num_bits": 8}}, "activation quantization"),
])
def test_compressed_tensors_unsupported_variants_are_named(change, message):
    config, tensors = ct_checkpoint(4, "group", True)
    qc = config["quantization_config"]
    group = qc["config_groups"]["group_0"]
    for key, value in change.items():
        (qc if key == "format" else group if key == "input_activations" else group["weights"])[key] = value
    with pytest.raises(ValueError, match=message):
        convert_tensors(config, tensors)


def test_compressed_tensors_config_groups_target_by_regex_before_class():
    config, int4 = ct_checkpoint(4, "group", True)
    _, int8 = ct_checkpoint(8, "channel", False)
    groups = config["quantization_config"]["config_groups"]
    groups["group_1"] = {**groups["group_0"], "targets": ["re:.*down_proj$"],
                         "weights": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}}
    tensors = {**{k.replace("layer", "mlp.up_proj"): v for k, v in int4.items()},
               **{k.replace("layer", "mlp.down_proj"): v for k, v in int8.items()}}
    _, modules = convert_tensors(config, tensors)
    assert modules["mlp.up_proj"]["scheme"] == "int4-g32"
    assert modules["mlp.down_proj"]["scheme"] == "int8-channel-asym"


def test_compressed_tensors_float_zero_points_are_rejected():
    config, tensors = ct_checkpoint(4, "group", False)
    tensors["layer.weight_zero_point"] = torch.zeros(N, K // 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="integer zero points"):
        convert_tensors(config, tensors)


def test_missing_tensor_is_named():
    config, tensors = gptq_checkpoint(4, 32, False)
    del tensors["layer.qzeros"]
    with pytest.raises(ValueError, match="missing tensor.*layer.qzeros"):
        convert_tensors(config, tensors)


# -- detection ---------------------------------------------------------------------------------

def test_detect_format():
    assert detect_format({"model_type": "llama"}) is None
    assert detect_format({"quantization_config": {"quant_method": "lowbit"}}) is None
    for method in ("gptq", "awq", "compressed-tensors"):
        assert detect_format({"quantization_config": {"quant_method": method}}) == method
    for method in ("exl2", "bitsandbytes", "marlin"):
        with pytest.raises(ValueError, match=method):
            detect_format({"quantization_config": {"quant_method": method}})


# -- whole checkpoints -------------------------------------------------------------------------

def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).half()


@pytest.fixture
def gptq_dir(tmp_path):
    """An AutoGPTQ-style checkpoint (v1, asymmetric, g32) of a tiny LLaMA, its quantize_config.json
    beside config.json, and the float model holding AutoGPTQ's dequantized weights."""
    model = tiny_llama()
    tensors = {k: v for k, v in model.state_dict().items()}
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    for name, m in linears:
        del tensors[name + ".weight"]
        tensors.update(gptq_layer(4, 32, True, "gptq", name=name, n=m.out_features, k=m.in_features, bias=False))
        with torch.no_grad():
            m.weight.copy_(gptq_dequantize(tensors, 4, "gptq", name=name))
    src = tmp_path / "gptq"
    src.mkdir()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(src)
    (src / "quantize_config.json").write_text(json.dumps(gptq_config(4, 32, True)))
    (src / "tokenizer.json").write_text("{}")
    return src, model, tensors, [name for name, _ in linears]


def test_load_foreign_gptq_model(gptq_dir):
    src, reference, tensors, quantized = gptq_dir
    assert detect_format(src) == "gptq"
    model = load_foreign(src)
    for name in quantized:
        layer = model.get_submodule(name)
        assert isinstance(layer, lowbit.QuantLinear)
        assert torch.equal(layer.qweight.dequantize(torch.float32), gptq_dequantize(tensors, 4, "gptq", name=name))
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), reference.float()(ids).logits, atol=2e-2, rtol=1e-2)


def test_load_quantized_imports_a_gptq_directory(gptq_dir):
    src, _, _, _ = gptq_dir
    expected = load_foreign(src).state_dict()
    state = lowbit.load_quantized(src).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_convert_writes_a_lowbit_checkpoint(gptq_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src, _, _, quantized = gptq_dir
    out = convert(src, tmp_path / "lowbit")
    assert (out / "tokenizer.json").exists() and not (out / "quantize_config.json").exists()
    assert detect_format(out) is None
    expected = load_foreign(src).state_dict()
    for loaded in (lowbit.load_quantized(out, verify=True), AutoModelForCausalLM.from_pretrained(out)):
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_readme_snippet_runs(gptq_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(gptq_dir[0], tmp_path / "my-gptq-model")
    model = runpy.run_path(str(SNIPPET))["model"]
    assert isinstance(model.model.layers[0].mlp.down_proj, lowbit.QuantLinear)
    assert (tmp_path / "my-model-lowbit" / "model.safetensors").exists()
