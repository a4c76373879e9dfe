"""``lowbit bench e2e`` at the tiny model size: structure, not speed."""

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit import QuantLinear
from lowbit.bench import e2e

TINY = e2e.MODELS["tiny"]


def _decoder_linears(model):
    return [(name, m) for layer in model.model.layers for name, m in layer.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear))]


def test_main_writes_json_rows_and_table(tmp_path, capsys):
    path, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert e2e.main(["--device", "cpu", "--models", "tiny", "--schemes", "fp16", "int4-g32", "--batches", "1", "2",
                     "--prompt-len", "8", "--gen-len", "6", "--json", str(path), "--plot", str(png)]) == 0
    result = json.loads(path.read_text())
    assert result["kind"] == "e2e" and result["errors"] == [] and png.stat().st_size > 0
    rows = result["rows"]
    assert [(r["scheme"], r["batch"]) for r in rows] == [("fp16", 1), ("fp16", 2), ("int4-g32", 1), ("int4-g32", 2)]
    fp16 = {r["batch"]: r["tokens_per_s"] for r in rows if r["scheme"] == "fp16"}
    for r in rows:
        assert set(r) == {"model", "scheme", "batch", "prefill_ms", "tokens_per_s", "tpot_ms",
                          "baseline_tokens_per_s", "speedup", "peak_mem_gb"}
        assert r["model"] == "tiny" and r["prefill_ms"] > 0 and r["tokens_per_s"] > 0 and r["tpot_ms"] > 0
        assert r["baseline_tokens_per_s"] == fp16[r["batch"]]
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["baseline_tokens_per_s"])
        # tokens/s counts every sequence of the batch: batch / time per output token
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["tpot_ms"] * 1e3)
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[:3] == ["tiny", "int4-g32", "2"]


def test_replot_draws_and_prints_an_earlier_run_without_measuring(tmp_path, capsys):
    path, png = tmp_path / "e2e.json", tmp_path / "replot.png"
    e2e.main(["--device", "cpu", "--models", "tiny", "--schemes", "fp16", "--batches", "1", "--prompt-len", "4",
              "--gen-len", "5", "--json", str(path)])
    table = capsys.readouterr().out.split("\n", 1)[1]  # (after the progress line)
    assert e2e.main(["--replot", str(path), "--plot", str(png)]) == 0
    assert capsys.readouterr().out == table and png.stat().st_size > 0
    layers_json = tmp_path / "layers.json"
    layers_json.write_text(json.dumps({"kind": "layers"}))
    with pytest.raises(SystemExit):
        e2e.main(["--replot", str(layers_json)])
    assert "expected a `lowbit bench e2e` result, found kind 'layers'" in capsys.readouterr().err


def test_layers_replot_prints_the_table_of_its_json(tmp_path, capsys):
    from lowbit.bench import layers

    blocks = [{"layer_set": "llama2-7b", "scheme": "int4-g128", "dtype": "float16", "M": m, "us": 10.0 * m,
               "baseline_us": 20.0 * m + 5, "speedup": (20.0 * m + 5) / (10.0 * m), "roofline_frac": 0.5}
              for m in (1, 16)]
    result = {"kind": "layers", "gpu": "test GPU", "commit": "abc", "copy_bandwidth_gbs": 1000.0, "rows": [],
              "blocks": blocks, "errors": []}
    path, png = tmp_path / "layers.json", tmp_path / "layers.png"
    path.write_text(json.dumps(result))
    assert layers.main(["--replot", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "test GPU" in out and "2.50" in out.split("int4-g128")[-1] and png.stat().st_size > 0
    (tmp_path / "e2e.json").write_text(json.dumps({"kind": "e2e"}))
    (tmp_path / "broken.json").write_text("{")
    for wrong, message in [("e2e.json", "expected a `lowbit bench layers` result, found kind 'e2e'"),
                           ("broken.json", "not a readable benchmark JSON"), ("missing.json", "not a readable")]:
        with pytest.raises(SystemExit):
            layers.main(["--replot", str(tmp_path / wrong)])
        assert message in capsys.readouterr().err


def test_layers_run_sums_each_scheme_over_the_block_and_keeps_going_past_a_failed_scheme(monkeypatch):
    from lowbit.bench import common, layers

    # The run's loop on the CPU: the timers, the bandwidth probes and the GPU's name patched out.
    monkeypatch.setattr(layers, "run_metadata", lambda device: {"gpu": "test GPU"})
    monkeypatch.setattr(layers, "copy_bandwidth_gbs", lambda device: 1000.0)
    monkeypatch.setattr(layers, "read_bandwidth_gbs", lambda device: 2000.0)
    monkeypatch.setattr(layers, "random_qweight", lambda scheme, n, k, dtype, device: common.random_qweight(
        scheme, n // 64, k // 64, dtype, "cpu"))
    monkeypatch.setattr(layers, "_check", lambda qw, device: 1e-4)
    monkeypatch.setattr(layers, "_cublas_us", lambda k, n, m, dtype, device, replays: 4.0 * m)

    def lowbit_us(qw, m, device, replays, config=None):
        if qw.scheme.bits == 8:
            raise RuntimeError("simulated kernel failure")
        return 1.0 * m

    monkeypatch.setattr(layers, "_lowbit_us", lowbit_us)
    said = []
    result = layers.run(["llama2-7b"], ["int4-g128", "int8-channel"], [1, 16], [torch.float16], device="cpu",
                        progress=said.append)
    assert {(b["scheme"], b["M"]) for b in result["blocks"]} == {("int4-g128", 1), ("int4-g128", 16)}
    assert all(b["us"] == 4 * b["M"] and b["speedup"] == 4.0 for b in result["blocks"])  # four layers a block
    assert len(result["rows"]) == 8 and result["errors"][0]["scheme"] == "int8-channel"
    assert any("int8-channel: FAILED RuntimeError" in line for line in said)


def test_layers_table_roofline_uses_the_read_bandwidth_when_measured():
    from lowbit.bench import layers

    block = {"layer_set": "llama2-7b", "scheme": "int4-g128", "dtype": "float16", "M": 1, "us": 10.0,
             "baseline_us": 25.0, "speedup": 2.5, "roofline_frac": 0.5, "read_roofline_frac": 0.4}
    old = {"kind": "layers", "gpu": "g", "commit": "abc", "copy_bandwidth_gbs": 1000.0, "blocks": [block]}
    assert layers.format_table(old).splitlines()[-1].endswith("50%")
    new = layers.format_table({**old, "read_bandwidth_gbs": 1250.0})
    assert "read bandwidth 1250 GB/s" in new and new.splitlines()[-1].endswith("40%")


def test_out_of_memory_is_recorded_and_leaves_baseline_null(monkeypatch):
    build = e2e.build_model

    def fp16_does_not_fit(name, scheme, device, dtype=torch.float16, fused=True):
        if scheme == "fp16":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return build(name, scheme, device, dtype, fused)

    monkeypatch.setattr(e2e, "build_model", fp16_does_not_fit)
    result = e2e.run(["tiny"], ["fp16", "int4-g32"], [1], prompt_len=4, gen_len=5, device="cpu",
                     progress=lambda _: None)
    assert result["errors"] == [{"model": "tiny", "scheme": "fp16", "batch": None,
                                 "error": "CUDA out of memory (simulated)"}]
    (row,) = result["rows"]
    assert row["scheme"] == "int4-g32" and row["baseline_tokens_per_s"] is None and row["speedup"] is None
    assert "FAILED: CUDA out of memory" in e2e.format_table(result)


def test_greedy_tokens_int4_and_fp16():
    prompt = torch.randint(0, TINY["vocab_size"], (3, 8))
    for scheme in ("fp16", "int4-g32"):
        gen = e2e.generate(e2e.build_model("tiny", scheme, "cpu"), prompt, gen_len=7, mode="eager")
        assert gen.tokens.shape == (3, 7) and gen.tokens.dtype == torch.long
        assert 0 <= gen.tokens.min() and gen.tokens.max() < TINY["vocab_size"]
        assert gen.timed_steps == 7 - 1 - e2e.WARMUP_STEPS and gen.prefill_s > 0 and gen.decode_s > 0


def test_static_cache_decoding_matches_full_recompute():
    """Greedy decoding through the static cache gives the tokens of re-running the whole sequence each step."""
    model = e2e.build_model("tiny", "int4-g32", "cpu", dtype=torch.float32)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 6))
    gen = e2e.generate(model, prompt, gen_len=6, mode="eager")
    seq = prompt
    with torch.inference_mode():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gen.tokens, seq[:, prompt.shape[1]:])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_quantized_model_structure_and_finite_logits(fused):
    model = e2e.build_model("tiny", "int4-g32", "cpu", fused=fused)
    linears = _decoder_linears(model)
    assert len(linears) == (4 if fused else 7) * TINY["num_hidden_layers"]
    assert all(type(m) is QuantLinear and str(m.scheme) == "int4-g32" for _, m in linears)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float16
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    logits = model(torch.randint(0, TINY["vocab_size"], (2, 5))).logits
    assert logits.shape == (2, 5, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_fp16_model_keeps_dense_linears():
    model = e2e.build_model("tiny", "fp16", "cpu")
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float16 for _, m in _decoder_linears(model))
    assert 0.01 < model.model.layers[0].mlp.fused_projection.weight.float().std() < 0.03


def test_tied_embeddings_stay_tied():
    config = e2e.model_config("smollm2-135m")
    assert config.tie_word_embeddings and config.num_key_value_heads == 3
    e2e.MODELS["tied-tiny"] = {**TINY, "tie_word_embeddings": True}
    try:
        model = e2e.build_model("tied-tiny", "int4-g32", "cpu")
    finally:
        del e2e.MODELS["tied-tiny"]
    assert model.lm_head.weight is model.model.embed_tokens.weight


class _RecordAllocations(TorchDispatchMode):
    """Shapes and dtypes of every non-meta tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.created.append((tuple(t.shape), t.dtype))
        return out


def test_builder_never_allocates_dense_quantized_linears(monkeypatch):
    # a vocabulary unlike any linear's width (tiny's 256 is fused gate/up's), so shapes tell them apart
    monkeypatch.setitem(e2e.MODELS, "tiny-vocab", {**TINY, "vocab_size": 300})
    config = e2e.model_config("tiny-vocab")
    with _RecordAllocations() as record:
        model = e2e.build_model("tiny-vocab", "int4-g32", "cpu")
    dense_shapes = {(m.out_features, m.in_features) for _, m in _decoder_linears(model)}
    float_tensors = [s for s, dtype in record.created if dtype.is_floating_point]
    assert not [s for s in float_tensors if s in dense_shapes or s[::-1] in dense_shapes]
    # the only large float tensors are the embedding and lm_head
    big = [s for s in float_tensors if len(s) == 2 and min(s) > 16]
    assert big and set(big) == {(config.vocab_size, config.hidden_size)}
    # each QuantLinear holds its packed codes and scales only, no dense weight
    for _, m in _decoder_linears(model):
        held = {n for n, _ in m.named_buffers()} | {n for n, _ in m.named_parameters()}
        assert held == {*m._packed_names, "scales"}


@pytest.mark.parametrize("args,message", [
    (["--models", "llama9-1b"], "invalid choice: 'llama9-1b'"),
    (["--schemes", "int9-g7"], "bad scheme 'int9-g7'"),
    (["--gen-len", "2"], "--gen-len must be at least"),
    (["--decode", "graph"], "needs a CUDA device"),
])
def test_bad_arguments_exit_with_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--device", "cpu", "--models", "tiny", "--batches", "1", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_cuda_decode_modes_match_eager(mode):
    model = e2e.build_model("tiny", "int4-g32", "cuda", dtype=torch.float32)
    prompt = torch.randint(0, TINY["vocab_size"], (4, 8), device="cuda")
    eager = e2e.generate(model, prompt, gen_len=10, mode="eager")
    graphed = e2e.generate(model, prompt, gen_len=10, mode=mode)
    assert torch.equal(graphed.tokens, eager.tokens)
