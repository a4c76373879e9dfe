"""Perplexity and KL divergence of a causal LM over a token stream, with a sliding window.

Windows follow the Hugging Face perplexity guide: a window of up to ``seq_len`` tokens starts every
``stride`` tokens and scores only the tokens the previous window did not, so every token but the
first is scored exactly once, with at least ``seq_len - stride`` tokens of context (except in
the first window).

KL is ``KL(reference || model)`` of the next-token distributions at every scored position, averaged
over positions: far more sensitive than perplexity to small weight changes. The reference's
log-probabilities can be kept (:class:`ReferenceLogProbs`) and reused for many models over the
same tokens, so the reference runs once.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["Window", "sliding_windows", "ReferenceLogProbs", "EvalResult", "evaluate", "perplexity", "kl_divergence"]


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` are the model's input; the last ``scored`` of them are its targets."""
    begin: int
    end: int
    scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    if seq_len < 2 or not 1 <= stride < seq_len:  # stride < seq_len: each window's first target has context
        raise ValueError(f"need seq_len >= 2 and 1 <= stride < seq_len, got seq_len={seq_len}, stride={stride}")
    windows, scored_until = [], 1  # token 0 has no context: it is never a target
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return windows


@dataclass
class ReferenceLogProbs:
    """A reference model's next-token log-probabilities (float32, CPU) at the scored positions of
    each window of ``sliding_windows(n_tokens, seq_len, stride)``: ``log_probs[i]`` is ``[scored, vocab]``."""
    n_tokens: int
    seq_len: int
    stride: int
    log_probs: list[torch.Tensor] = field(default_factory=list)

    def check_matches(self, n_tokens: int, seq_len: int, stride: int) -> None:
        if (self.n_tokens, self.seq_len, self.stride) != (n_tokens, seq_len, stride):
            raise ValueError(f"reference log-probs were computed for n_tokens={self.n_tokens}, seq_len={self.seq_len}, "
                             f"stride={self.stride}, not n_tokens={n_tokens}, seq_len={seq_len}, stride={stride}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.log_probs)


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_evaluated: int
    kl: float | None = None  # mean KL(reference || model) per scored token (nats), when a reference was given
    reference: ReferenceLogProbs | None = field(default=None, repr=False)  # this model's log-probs, when kept

    def as_dict(self) -> dict:
        out = {"ppl": self.ppl, "nll": self.nll, "tokens_evaluated": self.tokens_evaluated}
        if self.kl is not None:
            out["kl"] = self.kl
        return out


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _batches(windows: list[Window], batch_size: int) -> list[list[int]]:
    """Indices of consecutive windows of equal length, at most ``batch_size`` per batch (no padding)."""
    batches: list[list[int]] = []
    for i, w in enumerate(windows):
        if batches and len(batches[-1]) < batch_size and windows[batches[-1][0]].length == w.length:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _log_probs(model: nn.Module, tokens: torch.Tensor, windows: list[Window]) -> list[torch.Tensor]:
    """float32 next-token log-probs ``[scored, vocab]`` at each window's scored positions."""
    device = _model_device(model)
    inputs = torch.stack([tokens[w.begin:w.end] for w in windows]).to(device)
    keep = max(w.scored for w in windows) + 1  # logits at position t predict token t + 1
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep  # skip the vocabulary projection of context-only positions
    logits = model(inputs, **kwargs).logits[:, -keep:]
    # One window at a time: the float32 copy of a whole batch's logits is large (vocab ~50k).
    return [logits[i, keep - 1 - w.scored:keep - 1].float().log_softmax(-1) for i, w in enumerate(windows)]


@torch.inference_mode()
def evaluate(model: nn.Module, tokens: torch.Tensor, seq_len: int = 512, stride: int = 256, batch_size: int = 8,
             reference: "nn.Module | ReferenceLogProbs | None" = None, keep_reference: bool = False,
             progress: bool = True, desc: str = "eval") -> EvalResult:
    """Perplexity of ``model`` over ``tokens`` (1-D token ids); with ``reference`` (a model, or the
    log-probs kept from an earlier run over the same tokens and windows) also the mean KL.
    ``keep_reference=True`` keeps this model's log-probs in the result (``tokens_evaluated * vocab``
    float32 values in CPU memory) to serve as a later run's reference."""
    tokens = torch.as_tensor(tokens).flatten().to(torch.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = sliding_windows(len(tokens), seq_len, stride)
    if isinstance(reference, ReferenceLogProbs):
        reference.check_matches(len(tokens), seq_len, stride)
    kept = ReferenceLogProbs(len(tokens), seq_len, stride) if keep_reference else None
    was_training = model.training
    model.eval()
    nll_sum, kl_sum, scored = 0.0, 0.0, 0
    bar = tqdm(total=len(tokens) - 1, desc=desc, unit="tok", disable=not progress)
    try:
        for batch in _batches(windows, batch_size):
            batch_windows = [windows[i] for i in batch]
            log_probs = _log_probs(model, tokens, batch_windows)
            if isinstance(reference, nn.Module):
                ref_log_probs = _log_probs(reference, tokens, batch_windows)
            elif reference is not None:
                ref_log_probs = [reference.log_probs[i] for i in batch]
            for j, (w, lp) in enumerate(zip(batch_windows, log_probs)):
                targets = tokens[w.end - w.scored:w.end].to(lp.device)
                nll_sum += -lp.gather(-1, targets[:, None]).sum().item()
                if reference is not None:
                    ref = ref_log_probs[j].to(lp.device)
                    kl_sum += (ref.exp() * (ref - lp)).sum().item()
                if kept is not None:
                    kept.log_probs.append(lp.cpu())
                scored += w.scored
                bar.update(w.scored)
    finally:
        bar.close()
        model.train(was_training)
    nll = nll_sum / scored
    return EvalResult(ppl=math.exp(nll), nll=nll, tokens_evaluated=scored,
                      kl=None if reference is None else kl_sum / scored, reference=kept)


def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int = 512, stride: int = 256, batch_size: int = 8,
               progress: bool = True) -> dict:
    """``{"ppl", "nll", "tokens_evaluated"}`` of ``model`` over ``tokens`` (see :func:`evaluate`)."""
    return evaluate(model, tokens, seq_len, stride, batch_size, progress=progress, desc="perplexity").as_dict()


def kl_divergence(model: nn.Module, ref_model: "nn.Module | ReferenceLogProbs", tokens: torch.Tensor,
                  seq_len: int = 512, stride: int = 256, batch_size: int = 8, progress: bool = True) -> float:
    """Mean ``KL(ref_model || model)`` of next-token distributions over the windows of ``tokens``."""
    return evaluate(model, tokens, seq_len, stride, batch_size, reference=ref_model, progress=progress,
                    desc="KL").kl
