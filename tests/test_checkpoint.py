"""save_quantized / load_quantized: bit-exact round trips, Hugging Face layout, sharding, atomicity."""

import json

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import lowbit
from lowbit import QuantizedWeight, QuantLinear
from lowbit.io.checkpoint import (CONFIG_NAME, INDEX_NAME, SHA256_PREFIX, SINGLE_FILE, CheckpointError,
                                  load_quantized, save_quantized, tensor_sha256)

transformers = pytest.importorskip("transformers")


def mlp_skeleton() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 160, bias=False), nn.LayerNorm(160),
                         nn.Linear(160, 48), nn.Linear(48, 32))


def quantized_mlp() -> nn.Sequential:
    """Three schemes (asymmetric groups, 3-bit act-order, float per-channel) and one layer left unquantized."""
    model = mlp_skeleton()
    model[0] = QuantLinear.from_linear(model[0], "int4-g32-asym")
    perm = torch.randperm(96)
    qw = lowbit.quantize(model[2].weight.detach()[:, perm], "int3-g32")  # act-order codes hold W[:, perm]
    model[2] = QuantLinear.from_qweight(QuantizedWeight(qw.scheme, qw.shape, qw.packed, qw.scales, qw.zeros, perm,
                                                        qw.dtype))
    model[4] = QuantLinear.from_linear(model[4], "fp6_e3m2-channel")
    return model.eval()


def tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def stored_keys(path) -> set[str]:
    keys = set()
    for file in sorted(path.glob("*.safetensors")):
        with safetensors.safe_open(file, framework="pt") as f:
            keys.update(f.keys())
    return keys


# -- plain nn.Module -----------------------------------------------------------------------------

def test_mlp_round_trip_is_bit_exact(tmp_path):
    model = quantized_mlp()
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", model=mlp_skeleton(), verify=True)
    assert_same_state(model, loaded)
    assert [type(m) for m in loaded] == [QuantLinear, nn.GELU, QuantLinear, nn.LayerNorm, QuantLinear, nn.Linear]
    assert [str(loaded[i].scheme) for i in (0, 2, 4)] == ["int4-g32-asym", "int3-g32", "fp6_e3m2-channel"]
    assert loaded[2].perm is not None and not loaded.training
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_config_and_hashes(tmp_path):
    model = quantized_mlp()
    save_quantized(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert list(config) == ["quantization_config"]  # a plain module has no model config
    q = config["quantization_config"]
    assert (q["quant_method"], q["format_version"], q["layout"]) == ("lowbit", 1, lowbit.pack.LAYOUT)
    assert q["scheme"] == "int4-g32-asym" and q["modules_to_not_convert"] == ["5"]
    assert q["modules"]["2"] == {"scheme": "int3-g32", "shape": [160, 96], "dtype": "float32", "act_order": True}
    assert set(q["modules"]) == {"0", "2", "4"}

    with safetensors.safe_open(tmp_path / "ckpt" / SINGLE_FILE, framework="pt") as f:
        metadata = f.metadata()
        assert set(f.keys()) == set(model.state_dict())
        for key in f.keys():
            assert metadata[SHA256_PREFIX + key] == tensor_sha256(f.get_tensor(key))
    assert metadata["format"] == "pt"


def test_plain_module_needs_a_skeleton(tmp_path):
    save_quantized(quantized_mlp(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="model="):
        load_quantized(tmp_path / "ckpt")


def test_shared_module_is_stored_once(tmp_path):
    def skeleton():
        norm = nn.LayerNorm(96)
        return nn.Sequential(nn.Linear(64, 96), norm, nn.Linear(96, 96), norm)

    model = lowbit.quantize_model(skeleton(), "int8-channel", progress=False)
    nn.init.normal_(model[1].weight)
    save_quantized(model, tmp_path / "ckpt")
    assert not stored_keys(tmp_path / "ckpt") & {"3.weight", "3.bias"}
    loaded = load_quantized(tmp_path / "ckpt", model=skeleton())
    assert loaded[3].weight is loaded[1].weight
    assert_same_state(model, loaded)


def test_dtype_casts_only_unquantized_tensors(tmp_path):
    save_quantized(quantized_mlp(), tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", model=mlp_skeleton(), dtype=torch.bfloat16)
    assert loaded[3].weight.dtype == loaded[5].weight.dtype == torch.bfloat16
    assert loaded[4].scales.dtype == torch.float32 and loaded[0].bias.dtype == torch.float32


def test_failed_load_gives_the_skeleton_back(tmp_path):
    save_quantized(quantized_mlp(), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["quantization_config"]["modules"]["4"]["act_order"] = True  # no perm stored for layer 4
    config_path.write_text(json.dumps(config))
    skeleton = mlp_skeleton()
    with pytest.raises(CheckpointError, match="perm"):
        load_quantized(tmp_path / "ckpt", model=skeleton)
    assert all(type(m) is not QuantLinear for m in skeleton.modules())


def test_mismatched_skeleton_is_left_as_it_was(tmp_path):
    save_quantized(quantized_mlp(), tmp_path / "ckpt")
    skeleton = mlp_skeleton()
    skeleton[4] = nn.Linear(160, 40)  # the last quantized layer does not fit
    with pytest.raises(CheckpointError, match=r"modules\['4'\]"):
        load_quantized(tmp_path / "ckpt", model=skeleton)
    assert all(type(m) is not QuantLinear for m in skeleton.modules())


# -- Hugging Face LLaMA --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,dtype", [("int4-g32-asym", torch.float16), ("int3-g32", torch.float32),
                                          ("fp6_e3m2-channel", torch.bfloat16), ("int4-g32-2:4", torch.float16),
                                          ("fp8_e4m3-channel-2:4", torch.bfloat16)])
def test_llama_round_trip_is_bit_exact(tmp_path, scheme, dtype):
    model = lowbit.quantize_model(tiny_llama(dtype), scheme, progress=False)
    save_quantized(model, tmp_path / "ckpt")

    # The files hold exactly the state dict's keys, the tied lm_head stored once (as the embeddings).
    assert stored_keys(tmp_path / "ckpt") == set(model.state_dict()) - {"lm_head.weight"}
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64
    q = config["quantization_config"]
    assert q["scheme"] == scheme and q["modules_to_not_convert"] == ["lm_head"] and len(q["modules"]) == 14

    loaded = load_quantized(tmp_path / "ckpt", verify=True)
    assert_same_state(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert type(loaded.lm_head) is nn.Linear and type(loaded.model.layers[1].mlp.down_proj) is QuantLinear
    tokens = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_llama_into_a_given_skeleton(tmp_path):
    model = lowbit.quantize_model(tiny_llama(), "int4-g32", progress=False)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", model=tiny_llama())
    assert_same_state(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_round_trip(tmp_path):
    model = lowbit.quantize_model(tiny_llama(), "int4-g32-asym", progress=False)
    save_quantized(model, tmp_path / "ckpt", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "ckpt" / SINGLE_FILE).exists()
    index = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == stored_keys(tmp_path / "ckpt")
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for k, t in
                                                  model.state_dict().items() if k != "lm_head.weight")
    assert_same_state(model, load_quantized(tmp_path / "ckpt", verify=True))


# -- writing -------------------------------------------------------------------------------------

def test_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    model = quantized_mlp()
    save_quantized(model, target, max_shard_size=2000)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(model, target)
    save_quantized(model, target, overwrite=True)  # one file now: the old shards must be gone
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, SINGLE_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    (tmp_path / "empty").mkdir()
    save_quantized(model, tmp_path / "empty")  # an existing empty directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        save_quantized(model, tmp_path / "file")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = quantized_mlp()
    save_quantized(model, tmp_path / "old")
    real_save_file, calls = safetensors.torch.save_file, []

    def failing_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "new", max_shard_size=2000)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "old", max_shard_size=2000, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert_same_state(model, load_quantized(tmp_path / "old", model=mlp_skeleton(), verify=True))


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(mlp_skeleton(), tmp_path / "a")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(quantized_mlp(), tmp_path / "b", max_shard_size="2 lots")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(quantized_mlp(), tmp_path / "c", max_shard_size=0)
    assert list(tmp_path.iterdir()) == []
