"""The vLLM plugin: tensor-parallel sharding of lowbit weights (no vLLM needed), and, marked
``vllm``, a real vLLM serving a lowbit checkpoint with the same greedy tokens as transformers."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.integrations.vllm import (check_output_partitions, column_shard, fuse_columns, row_shard,
                                      slice_input_codes)

E2E_SCRIPT = Path(__file__).with_name("vllm_e2e_script.py")
VLLM_SNIPPET = Path(__file__).parents[1] / "docs" / "snippets" / "vllm_generate.py"


def weight(n, k, scheme, seed=0):
    torch.manual_seed(seed)
    return lowbit.quantize(torch.randn(n, k, dtype=torch.float16), scheme)


def dense(qw):
    return qw.dequantize(torch.float32)


def vllm_column_shards(parts, tp, kv_parts=()):
    """Each rank's fused weight as vLLM's column-parallel loaders build it: rank r takes slice r of
    every part; a K/V part with fewer heads than ranks is replicated (slice r // replicas)."""
    shards = []
    for rank in range(tp):
        pieces = []
        for i, qw in enumerate(parts):
            slices = min(tp, kv_parts[i]) if i < len(kv_parts) and kv_parts[i] else tp
            size = qw.out_features // slices
            pieces.append(column_shard(qw, (rank // (tp // slices)) * size, size))
        shards.append(fuse_columns(pieces))
    return shards


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g16-asym", "fp6_e3m2-channel", "int8-g64"])
def test_column_parallel_fused_qkv(tp, scheme):
    """q (8 heads of 16), k and v (2 heads each: replicated across ranks at tp=4)."""
    q, k, v = weight(128, 96, scheme, 1), weight(32, 96, scheme, 2), weight(32, 96, scheme, 3)
    full = fuse_columns([q, k, v])
    x = torch.randn(5, 96)
    y = lowbit.matmul(x, full)
    for rank, shard in enumerate(vllm_column_shards([q, k, v], tp, kv_parts=(None, 2, 2))):
        qs, kvs = 128 // tp, 32 // min(tp, 2)
        kv_rank = rank // (tp // min(tp, 2))
        rows = torch.cat([torch.arange(rank * qs, (rank + 1) * qs),
                          128 + torch.arange(kv_rank * kvs, (kv_rank + 1) * kvs),
                          160 + torch.arange(kv_rank * kvs, (kv_rank + 1) * kvs)])
        assert torch.equal(dense(shard), dense(full)[rows])
        torch.testing.assert_close(lowbit.matmul(x, shard), y[:, rows])


@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_merged_gate_up(tp):
    gate, up = weight(64, 128, "int4-g32-asym", 1), weight(64, 128, "int4-g32-asym", 2)
    full = fuse_columns([gate, up])
    for rank, shard in enumerate(vllm_column_shards([gate, up], tp)):
        size = 64 // tp
        own = torch.arange(rank * size, (rank + 1) * size)
        rows = torch.cat([own, 64 + own])
        assert torch.equal(dense(shard), dense(full)[rows])


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("k,scheme", [
    (512, "int4-g32"),  # shards of whole 128-wide tiles: a slice of words
    (576, "int4-g16"),  # SmolLM2's hidden size: shards of 288 / 144 columns split tiles, so repacked
    (576, "int3-g16-asym"), (576, "fp6_e3m2-channel"), (1536, "int8-g64"),
])
def test_row_parallel_partial_sums(tp, k, scheme):
    qw = weight(40, k, scheme)
    x = torch.randn(3, k)
    size = k // tp
    partial = []
    for rank in range(tp):
        shard = row_shard(qw, rank, tp)
        cols = slice(rank * size, (rank + 1) * size)
        assert torch.equal(dense(shard), dense(qw)[:, cols])
        partial.append(lowbit.matmul(x[:, cols], shard).float())
    torch.testing.assert_close(sum(partial), lowbit.matmul(x, qw).float(), atol=1e-3, rtol=1e-3)


def test_row_parallel_last_rank_on_a_tile_boundary():
    """576 = 3 x 192: rank 2 starts on a tile boundary, ranks 0 and 1 do not; all are repacked."""
    qw = weight(16, 576, "int4-g64")
    for rank in range(3):
        assert torch.equal(dense(row_shard(qw, rank, 3)), dense(qw)[:, rank * 192:(rank + 1) * 192])


def test_word_slices_equal_repacking():
    """On tile boundaries the packed words are sliced; that must equal unpack, slice, repack."""
    qw = weight(8, 640, "int5-g32")
    plain = slice_input_codes(qw.packed, 5, 640, 256, 384, rows=8)
    repacked = lowbit.pack.pack_codes(qw.codes()[:, 256:], 5)
    assert all(torch.equal(a, b) for a, b in zip(plain, repacked))


def test_column_shards_are_whole_row_blocks_but_the_last_may_end_on_the_last_row():
    qw = weight(40, 128, "int4-g32-asym")  # blocks of rows 0-15, 16-31 and 32-39
    for start, size in [(0, 16), (16, 24), (32, 8), (0, 40)]:
        assert torch.equal(dense(column_shard(qw, start, size)), dense(qw)[start:start + size])
    with pytest.raises(ValueError, match=r"column_shard: output rows \[8, 24\) of 40 are not whole 16-row blocks"):
        column_shard(qw, 8, 16)
    with pytest.raises(ValueError, match=r"output rows \[0, 24\) of 40 .* multiples of 16"):
        column_shard(qw, 0, 24)


def test_fused_parts_are_whole_row_blocks_but_the_last_may_end_on_the_last_row():
    gate, up = weight(32, 128, "int3-g16-asym", 1), weight(24, 128, "int3-g16-asym", 2)
    fused = fuse_columns([gate, up])
    assert torch.equal(dense(fused), torch.cat([dense(gate), dense(up)]))
    assert torch.equal(dense(column_shard(fused, 32, 24)), dense(up))
    with pytest.raises(ValueError, match=r"fuse_columns part 0: output rows \[0, 24\) of 56 are not whole"):
        fuse_columns([up, gate])


def test_vllm_output_partitions_are_whole_row_blocks():
    check_output_partitions("o_proj", [40], 40)  # not split: the last block may be partial
    check_output_partitions("qkv_proj", [64, 16, 16], 192)
    with pytest.raises(ValueError, match=r"qkv_proj: .* partitions of \[64, 24, 24\] rows .* multiples of 16"):
        check_output_partitions("qkv_proj", [64, 24, 24], 112)  # fused, even unsharded
    with pytest.raises(ValueError, match=r"gate_up_proj: .* partitions of \[168, 168\] rows"):
        check_output_partitions("gate_up_proj", [168, 168], 672)  # tensor parallel size 2
    with pytest.raises(ValueError, match=r"fc1: .* partitions of \[20\] rows"):
        check_output_partitions("fc1", [20], 40)  # column parallel, tensor parallel size 2


def test_row_parallel_rejects_what_lowbit_cannot_split():
    with pytest.raises(ValueError, match="whole number of 64-column groups"):
        row_shard(weight(8, 192, "int4-g64"), 0, 2)  # 96 columns per rank
    qw = weight(8, 256, "int4-g32")
    with_perm = lowbit.QuantizedWeight(qw.scheme, qw.shape, qw.packed, qw.scales, None, torch.randperm(256), qw.dtype)
    with pytest.raises(ValueError, match="act-order"):
        row_shard(with_perm, 0, 2)
    with pytest.raises(ValueError, match="different permutations"):
        fuse_columns([with_perm, lowbit.QuantizedWeight(qw.scheme, qw.shape, qw.packed, qw.scales, None,
                                                        torch.randperm(256), qw.dtype)])


# -- real vLLM ---------------------------------------------------------------------------------

def vllm_python():
    """A Python with vLLM and lowbit installed: $LOWBIT_VLLM_PYTHON, or this one if it has vLLM."""
    return os.environ.get("LOWBIT_VLLM_PYTHON") or (sys.executable if importlib.util.find_spec("vllm") else None)


# Logits closer than this are a coin toss between two correct float computations (a bf16 ulp
# near 8 is 0.06), e.g. a tensor-parallel all-reduce of bf16 partial sums against one fp32 sum.
NEAR_TIE = 0.1


def run_vllm(result_file: Path, *args, cwd=None, env=None) -> dict:
    run = subprocess.run([vllm_python(), str(E2E_SCRIPT), str(result_file), *args], capture_output=True, text=True,
                         timeout=1200, cwd=cwd, env=None if env is None else {**os.environ, **env})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(result_file.read_text())
    print(f"vLLM: {result['seconds']:.0f} s")
    return result


def assert_greedy_like_transformers(model_dir, prompts, vllm_outputs, min_compared):
    """Fed vLLM's greedy tokens, transformers ranks each within NEAR_TIE of its best logit, and picks it
    outright wherever its two best logits are further apart than that (a decisive step); at least
    ``min_compared`` decisive steps in all. (Teacher-forced, so a tie early on does not end the
    comparison: both sides go on from the same tokens.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    decisive = 0
    for prompt, got in zip(prompts, vllm_outputs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + got[:-1]])).logits[0, len(prompt) - 1:].float()
        for step, (row, token) in enumerate(zip(logits, got)):
            best, second = row.topk(2).values
            assert row[token] >= best - NEAR_TIE, (step, got, int(row.argmax()))
            if best - second >= NEAR_TIE:
                assert int(row.argmax()) == token, (step, got)
                decisive += 1
    assert decisive >= min_compared, f"only {decisive} tokens were not near-ties"


@pytest.mark.vllm
@pytest.mark.skipif(vllm_python() is None, reason="no Python with vLLM (set LOWBIT_VLLM_PYTHON)")
def test_vllm_layer_refuses_output_partitions_of_partial_row_blocks():
    """The plugin's create_weights refuses, before vLLM would load the packed rows at wrong block
    offsets, a gate_up_proj of 2 x 336 rows at tensor-parallel size 2 (168 rows a part and rank)."""
    script = """
import torch
import lowbit
from lowbit.integrations.vllm import LowbitLinearMethod

method = LowbitLinearMethod(lowbit.Scheme.parse("int4-g32"), torch.bfloat16, False, "mlp.gate_up_proj")
method.create_weights(None, 256, [168, 168], 256, 672, torch.bfloat16, weight_loader=None)
"""
    run = subprocess.run([vllm_python(), "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    expected = "ValueError: mlp.gate_up_proj: vLLM gives this rank output partitions of [168, 168] rows"
    assert expected in run.stderr, run.stderr[-3000:]


@pytest.fixture
def tiny_llama_int4(tmp_path):
    """A save_pretrained checkpoint (quantized while loading) of a 2-layer random LLaMA: head_dim 64
    for vLLM's CPU attention; down_proj's 320 inputs leave a partial 128-wide tile, and at TP 2 its
    160-column shards are repacked while o_proj's 128 are word slices. The fused parts are whole
    16-row blocks at TP 2 too (a rank's q: 128 rows, k and v: 64, gate and up: 160)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, initializer_range=0.2, eos_token_id=None)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp",
                                                 quantization_config=lowbit.LowbitConfig(scheme="int4-g32"))
    model.save_pretrained(tmp_path / "int4")
    return tmp_path / "int4"


@pytest.mark.vllm
@pytest.mark.skipif(vllm_python() is None, reason="no Python with vLLM (set LOWBIT_VLLM_PYTHON)")
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_serves_tiny_llama_like_transformers(tiny_llama_int4, tmp_path, tp):
    if tp > (os.cpu_count() or 1):
        pytest.skip(f"vLLM's CPU workers need a core each for tensor_parallel_size={tp}")
    prompts = [[1, 17, 42, 99, 5, 63], [1, 100, 7, 7, 31]]
    result = run_vllm(tmp_path / "vllm.json", "--model", str(tiny_llama_int4), "--prompt-ids", json.dumps(prompts),
                      "--max-tokens", "8", "--tensor-parallel-size", str(tp),
                      env={"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, range(tp)))})  # one core per worker
    assert_greedy_like_transformers(tiny_llama_int4, prompts, result["outputs"], min_compared=8)


@pytest.mark.vllm
@pytest.mark.skipif(vllm_python() is None, reason="no Python with vLLM (set LOWBIT_VLLM_PYTHON)")
def test_readme_vllm_snippet_serves_smollm2_like_transformers(tmp_path):
    """The README's vLLM snippet on a lowbit.save_quantized checkpoint of the embedded SmolLM2-135M."""
    from lowbit.data import load_default_model

    model, tokenizer = load_default_model(torch.bfloat16)
    lowbit.quantize_model(model, "int4-g32", progress=False)
    lowbit.save_quantized(model, tmp_path / "my-model-int4")
    tokenizer.save_pretrained(tmp_path / "my-model-int4")
    del model
    result = run_vllm(tmp_path / "vllm.json", "--snippet", str(VLLM_SNIPPET), cwd=tmp_path)
    assert_greedy_like_transformers(tmp_path / "my-model-int4", result["prompts"], result["outputs"], min_compared=4)
