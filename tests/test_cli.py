"""The lowbit command line on a tiny random LLaMA saved with save_pretrained."""

import importlib.util

import pytest

from lowbit.cli import main

pytest.importorskip("transformers")
from test_data_eval import char_tokenizer, tiny_llama  # noqa: E402  (shared tiny model and tokenizer)

HAS_CHECKPOINT = importlib.util.find_spec("lowbit.io.checkpoint") is not None
needs_checkpoint = pytest.mark.skipif(not HAS_CHECKPOINT, reason="lowbit.io.checkpoint is not written yet")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("command", [["quantize"], ["eval"], ["info"], ["convert"], ["bench"], ["accuracy"], []])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "usage: lowbit" in capsys.readouterr().out


@pytest.mark.parametrize("command,module", [(["bench", "layers"], "lowbit.bench.layers"),
                                            (["bench", "e2e"], "lowbit.bench.e2e"),
                                            (["tune"], "lowbit.kernels.tune")])
def test_forwarded_help(command, module, capsys):
    pytest.importorskip(module)
    assert main([*command, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_bad_scheme_exits_2_naming_allowed_forms(tmp_path, capsys):
    assert main(["quantize", "default", "--scheme", "int4-g100", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "power of two" in err and "FORMAT-gG or FORMAT-channel" in err and "int4-g128" in err
    assert main(["accuracy", "--schemes", "int9-g128"]) == 2
    assert "int4-g128" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err  # may also hold progress bars of loading
    errors = [line for line in err.splitlines() if line.startswith("lowbit: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_bad_inputs_exit_2_with_one_line(source, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["eval", str(source), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in _one_line_error(capsys)
    assert main(["info", str(tmp_path)]) == 2
    assert "not a lowbit checkpoint" in _one_line_error(capsys)
    assert main(["quantize", str(tmp_path), "--scheme", "int4-g32", "--out", str(tmp_path / "q"),
                 "--act-order"]) == 2
    assert "--act-order needs --method gptq" in _one_line_error(capsys)


def test_eval_an_unquantized_directory(source, capsys):
    assert main(["eval", str(source), "--max-tokens", "300", "--seq-len", "128", "--stride", "64"]) == 0
    out = capsys.readouterr().out
    assert "tokens evaluated: 299" in out and "perplexity:" in out and "lee_background" in out


def test_eval_with_a_text_file_and_a_reference(source, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    assert main(["eval", str(source), "--text", str(text), "--ref", str(source), "--seq-len", "64",
                 "--stride", "32"]) == 0
    out = capsys.readouterr().out
    assert f"tokens evaluated: {len(text.read_text()) - 1}" in out
    assert "mean KL" in out and "0.00000 nats" in out


@needs_checkpoint
def test_quantize_eval_info(source, tmp_path, capsys):
    out_dir = tmp_path / "q"
    assert main(["quantize", str(source), "--scheme", "int4-g32", "--out", str(out_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file()

    assert main(["quantize", str(source), "--scheme", "int4-g32", "--out", str(out_dir)]) == 2
    _one_line_error(capsys)  # refuses to overwrite without --overwrite
    assert main(["quantize", str(source), "--scheme", "int4-g32", "--out", str(out_dir), "--overwrite",
                 "--clip-search", "--exclude", "down_proj"]) == 0
    capsys.readouterr()

    assert main(["eval", str(out_dir), "--ref", str(source), "--max-tokens", "300", "--seq-len", "128",
                 "--stride", "64"]) == 0
    out = capsys.readouterr().out
    assert "tokens evaluated: 299" in out and "mean KL" in out and "0.00000 nats" not in out
    assert main(["eval", str(out_dir), "--dtype", "bfloat16", "--max-tokens", "200", "--seq-len", "128",
                 "--stride", "64"]) == 0
    assert "tokens evaluated: 199" in capsys.readouterr().out

    assert main(["quantize", str(out_dir), "--scheme", "int4-g32", "--out", str(tmp_path / "again")]) == 2
    assert "already a lowbit checkpoint" in _one_line_error(capsys)

    assert main(["info", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "int4-g32 (12 layers)" in out  # 2 layers x (q, k, v, o, gate, up); down_proj excluded
    assert "model.layers.0.self_attn.q_proj" in out and "down_proj" not in out
    assert "bits per weight" in out and "tensor files on disk" in out

    assert main(["info", str(out_dir), "--ref", str(source)]) == 0
    out = capsys.readouterr().out
    errors = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(errors) == 12 and all(0 < e < 0.3 for e in errors)


@needs_checkpoint
def test_corrupt_checkpoint_is_one_line(source, tmp_path, capsys):
    out_dir = tmp_path / "q"
    assert main(["quantize", str(source), "--scheme", "fp6_e3m2-channel", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    weights = out_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["info", str(out_dir)]) == 2
    assert "model.safetensors" in _one_line_error(capsys)


@needs_checkpoint
def test_quantize_gptq(source, tmp_path, capsys):
    pytest.importorskip("lowbit.quantize.gptq")
    out_dir = tmp_path / "q"
    assert main(["quantize", str(source), "--scheme", "int4-g32", "--out", str(out_dir), "--method", "gptq",
                 "--act-order", "--calib-seqs", "4", "--calib-len", "64"]) == 0
    assert "GPTQ calibration: 4 x 64 tokens" in capsys.readouterr().out
    assert main(["eval", str(out_dir), "--max-tokens", "200", "--seq-len", "128", "--stride", "64"]) == 0
    assert "tokens evaluated: 199" in capsys.readouterr().out
