"""lowbit as a transformers quantization method: load, quantize while loading, save, generate."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.integrations import transformers as lowbit_hf

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING  # noqa: E402

SNIPPET = Path(__file__).parents[1] / "docs" / "snippets" / "transformers_quickstart.py"
PROMPT = torch.tensor([[1, 17, 42, 99, 5]])


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, eos_token_id=None)
    return LlamaForCausalLM(config).half()


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp")
    tiny_llama().save_pretrained(path)
    return path


def greedy(model, tokens=6):
    return model.generate(PROMPT, max_new_tokens=tokens, do_sample=False)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_import_lowbit_defers_transformers_and_registers_when_it_loads():
    code = ("import sys, lowbit; assert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; assert 'lowbit' in m")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_register_is_idempotent():
    lowbit_hf.register()
    lowbit_hf.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is lowbit.LowbitConfig
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is lowbit_hf.LowbitHfQuantizer


def test_quantize_while_loading(fp_dir):
    fp = AutoModelForCausalLM.from_pretrained(fp_dir)
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=lowbit.LowbitConfig(scheme="int4-g32"))
    linears = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(q.config.quantization_config.modules) == sorted(linears)
    for name in linears:
        layer = q.get_submodule(name)
        expected = lowbit.quantize(fp.get_submodule(name).weight, "int4-g32")  # RTN: deterministic
        assert isinstance(layer, lowbit.QuantLinear)
        assert all(torch.equal(a, b) for a, b in zip(layer.qweight.tensors().values(), expected.tensors().values()))
    assert type(q.lm_head) is torch.nn.Linear and torch.equal(q.lm_head.weight, fp.lm_head.weight)
    assert torch.equal(q.model.embed_tokens.weight, fp.model.embed_tokens.weight)
    assert greedy(q).shape == (1, PROMPT.shape[1] + 6)


def test_modules_to_not_convert(fp_dir):
    config = lowbit.LowbitConfig(scheme="int8-channel", modules_to_not_convert=["lm_head", "down_proj"])
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)
    assert type(q.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(q.model.layers[0].mlp.up_proj, lowbit.QuantLinear)
    assert config.modules == {}  # the caller's config is left as given


def test_save_pretrained_round_trip(fp_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=lowbit.LowbitConfig(scheme="int4-g32-asym"))
    q.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_state(q, loaded)
    assert torch.equal(greedy(loaded), greedy(q))
    assert_same_state(q, lowbit.load_quantized(tmp_path, verify=True))


def test_fused_model_generates_the_same_and_refuses_to_save(fp_dir, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=lowbit.LowbitConfig(scheme="int4-g32"))
    expected = greedy(q)
    assert lowbit.fuse_projections(q) == 2 * q.config.num_hidden_layers
    assert torch.equal(greedy(q), expected)
    with pytest.raises(ValueError, match="save it before fusing"):
        q.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists() or not any((tmp_path / "fused").iterdir())  # nothing written


def test_from_pretrained_reads_save_quantized(tmp_path):
    """A lowbit.save_quantized checkpoint, act-order layer included, loads through transformers bit-exact."""
    model = lowbit.quantize_model(tiny_llama(), "int4-g32", progress=False)
    perm = torch.randperm(64)
    layer = model.model.layers[0].self_attn.q_proj
    qw = lowbit.quantize(layer.qweight.dequantize()[:, perm], "int4-g32")
    layer_with_perm = lowbit.QuantLinear.from_qweight(
        lowbit.QuantizedWeight(qw.scheme, qw.shape, qw.packed, qw.scales, None, perm, qw.dtype))
    model.model.layers[0].self_attn.q_proj = layer_with_perm
    lowbit.save_quantized(model, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert_same_state(model, loaded)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.perm, perm)
    assert torch.equal(greedy(loaded), greedy(model))


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "gptq"}, "calibration"), ({"scheme": "int9-g32"}, "int9"),
    ({"format_version": 2}, "format_version 2"), ({"layout": "other"}, "layout 'other'"),
])
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lowbit.LowbitConfig(**kwargs)


def test_readme_snippet_runs(fp_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.symlink(fp_dir, tmp_path / "my-model")
    runpy.run_path(str(SNIPPET))
    assert "tensor([[" in capsys.readouterr().out
    assert (tmp_path / "my-model-int4" / "model.safetensors").exists()
