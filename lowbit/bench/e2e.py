"""``lowbit bench e2e``: batched greedy decoding of LLaMA-shaped models, lowbit schemes vs fp16, one run.

Each model is built from its config on the meta device, then materialized layer by layer directly on
the target device with random weights: every decoder linear is a QuantLinear created in quantized form
(``random_qweight``), so a 70B model never exists in fp16; embeddings, norms and lm_head are dense fp16.
q/k/v and gate/up are fused into one linear each (as serving engines run them; ``--unfused``: as
transformers builds LLaMA).
Decoding uses transformers' StaticCache; on CUDA each decode step is either ``torch.compile``d with
``mode="reduce-overhead"`` (CUDA graphs, fused elementwise ops) or captured as-is in one CUDA graph.
Reports prefill time, decode tokens/s, time per output token and peak GPU memory per (model, scheme,
batch); the baseline is fp16 at the same batch in the same run. Writes JSON and a PNG, prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from ..nn import QuantLinear, fuse_projections
from ..scheme import Scheme
from .common import plot_speedups, random_qweight, replot, run_metadata

DENSE = "fp16"
DEFAULT_SCHEMES = [DENSE, "int4-g128", "fp6_e3m2-channel"]
DEFAULT_BATCHES = [1, 8, 16, 32, 64, 128]
DECODE_MODES = ("compile", "graph", "eager")
# Decode steps run before timing starts: torch.compile's warm-up and CUDA-graph recording happen here.
WARMUP_STEPS = 3

MODELS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    # For the CPU tests: every code path of the real shapes (GQA, untied lm_head), at toy size.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}


def model_config(name: str) -> LlamaConfig:
    return LlamaConfig(**{"tie_word_embeddings": False, "rms_norm_eps": 1e-5, **MODELS[name]},
                       attn_implementation="sdpa")


def _random_linear(scheme: str, linear: nn.Linear, dtype: torch.dtype, device) -> nn.Module:
    if scheme == DENSE:
        linear.to_empty(device=device)
        nn.init.normal_(linear.weight, std=0.02)
        return linear
    return QuantLinear.from_qweight(random_qweight(scheme, linear.out_features, linear.in_features, dtype, device))


def build_model(name: str, scheme: str, device, dtype: torch.dtype = torch.float16,
                fused: bool = True) -> LlamaForCausalLM:
    """A LlamaForCausalLM with random weights, materialized on ``device`` one decoder layer at a time.

    The model starts on the meta device; each decoder linear is replaced by a QuantLinear built from
    random codes on ``device`` (or, for ``fp16``, a dense random nn.Linear), so no dense copy of a
    quantized layer is ever allocated. ``fused``: q/k/v and gate/up run as one linear each
    (:func:`lowbit.nn.fuse_projections`, layer by layer)."""
    device = torch.device(device)
    config = model_config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    for layer in model.model.layers:
        for path, linear in [(p, m) for p, m in layer.named_modules() if isinstance(m, nn.Linear)]:
            parent, _, attr = path.rpartition(".")
            setattr(layer.get_submodule(parent), attr, _random_linear(scheme, linear, dtype, device))
        if fused:
            fuse_projections(layer)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.to_empty(device=device)
            nn.init.ones_(norm.weight)
    model.model.norm.to_empty(device=device)
    nn.init.ones_(model.model.norm.weight)
    model.model.embed_tokens.to_empty(device=device)
    nn.init.normal_(model.model.embed_tokens.weight, std=0.02)
    if config.tie_word_embeddings:  # to_empty made a new embedding parameter: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.to_empty(device=device)
        nn.init.normal_(model.lm_head.weight, std=0.02)
    # Rotary buffers are computed, not loaded: re-create the module on the device.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


class _GraphedDecodeStep:
    """One decode step captured in a CUDA graph on its first call (static token input, static logits
    output), replayed on the next. StaticCache advances its position on device, so replays stay correct."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graph = self.tokens = self.logits = None

    def _forward(self):
        return self.model(input_ids=self.tokens, past_key_values=self.cache, use_cache=True).logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.tokens.copy_(tokens)
            self.graph.replay()
            return self.logits
        self.tokens = tokens.clone()
        # A real decode step, run outside the capture so lazily compiled kernels are ready before it.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        return logits


def _decode_step(model, cache, mode: str):
    if mode == "graph":
        return _GraphedDecodeStep(model, cache)
    forward = model.forward
    if mode == "compile":
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    return lambda tokens: forward(input_ids=tokens, past_key_values=cache, use_cache=True).logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The prefill time is a median: one eager prefill's time varied by 25 % between runs (session 5).
PREFILL_REPEATS = 3


@dataclass
class Generation:
    tokens: torch.Tensor  # [batch, gen_len] greedy token ids
    prefill_s: float
    decode_s: float
    timed_steps: int  # decode steps inside decode_s (the first WARMUP_STEPS are not)


@torch.inference_mode()
def generate(model, prompt: torch.Tensor, gen_len: int, mode: str) -> Generation:
    """Greedy decoding of ``gen_len`` tokens after ``prompt [batch, prompt_len]`` with a static KV cache.
    The first token comes from the prefill, the others from decode steps."""
    if gen_len < WARMUP_STEPS + 2:
        raise ValueError(f"gen_len must be at least {WARMUP_STEPS + 2} (warm-up decode steps + one timed), "
                         f"got {gen_len}")
    device = prompt.device
    batch, prompt_len = prompt.shape

    cache = StaticCache(model.config, max_cache_len=prompt_len + gen_len)

    def prefill():
        return model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    prefill()  # untimed: lazy kernel compilation and tuning for this batch happen here
    times = []
    for _ in range(PREFILL_REPEATS):
        cache.reset()  # (untimed) a prefill appends to what the cache holds
        _sync(device)
        start = time.perf_counter()
        logits = prefill()
        _sync(device)
        times.append(time.perf_counter() - start)
    prefill_s = statistics.median(times)
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]

    step = _decode_step(model, cache, mode)
    for _ in range(WARMUP_STEPS):
        tokens.append(step(tokens[-1])[:, -1].argmax(-1, keepdim=True))
    _sync(device)
    start = time.perf_counter()
    while len(tokens) < gen_len:
        tokens.append(step(tokens[-1])[:, -1].argmax(-1, keepdim=True))
    _sync(device)
    return Generation(torch.cat(tokens, dim=1), prefill_s, time.perf_counter() - start, gen_len - 1 - WARMUP_STEPS)


def _free(device: torch.device) -> None:
    torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph memory pools
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _unless_oom(fn, errors: list, where: dict, progress):
    """``fn()``, or None after recording an out-of-memory error. Returning (rather than freeing inside
    the ``except``) lets the traceback, which holds the failed call's tensors, go first."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        progress(f"{where['model']} {where['scheme']} batch {where['batch']}: out of memory")
        errors.append({**where, "error": str(e)[:2000]})
    return None


def run(models, schemes, batches, prompt_len=128, gen_len=256, device="cuda", mode=None, progress=print,
        fused: bool = True) -> dict:
    device = torch.device(device)
    mode = mode or ("compile" if device.type == "cuda" else "eager")
    rows, errors = [], []
    for name in models:
        vocab = MODELS[name]["vocab_size"]
        for scheme in schemes:
            # e.g. a 70B model in fp16 on one 80 GB GPU
            model = _unless_oom(lambda: build_model(name, scheme, device, fused=fused), errors,
                                {"model": name, "scheme": scheme, "batch": None}, progress)
            if model is None:
                _free(device)
                continue
            for batch in batches:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
                gen = _unless_oom(lambda: generate(model, prompt, gen_len, mode), errors,
                                  {"model": name, "scheme": scheme, "batch": batch}, progress)
                if gen is not None:
                    tokens_per_s = batch * gen.timed_steps / gen.decode_s
                    rows.append({"model": name, "scheme": scheme, "batch": batch, "prefill_ms": gen.prefill_s * 1e3,
                                 "tokens_per_s": tokens_per_s, "tpot_ms": gen.decode_s / gen.timed_steps * 1e3,
                                 "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9
                                 if device.type == "cuda" else None})
                    progress(f"{name} {scheme} batch {batch}: {tokens_per_s:.0f} tok/s, "
                             f"prefill {gen.prefill_s * 1e3:.1f} ms")
                del gen, prompt
                _free(device)
            del model
            _free(device)
    baseline = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows if r["scheme"] == DENSE}
    for r in rows:
        b = baseline.get((r["model"], r["batch"]))
        r["baseline_tokens_per_s"], r["speedup"] = b, None if b is None else r["tokens_per_s"] / b
    return {"kind": "e2e", **run_metadata(device), "decode_mode": mode, "fused_projections": fused,
            "prompt_len": prompt_len, "gen_len": gen_len, "rows": rows, "errors": errors}


def format_table(result: dict) -> str:
    fused = {True: "  q/k/v and gate/up fused", False: "  projections unfused"}.get(result.get("fused_projections"), "")
    lines = [f"{result['gpu'] or result.get('device')}  commit {result.get('commit')}  decode {result['decode_mode']}  "
             f"prompt {result['prompt_len']}  generated {result['gen_len']}{fused}",
             f"{'model':14s}{'scheme':20s}{'batch':>6s}{'prefill ms':>12s}{'tok/s':>10s}{'tpot ms':>9s}"
             f"{'speedup':>9s}{'peak GB':>9s}"]
    for r in result["rows"]:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        lines.append(f"{r['model']:14s}{r['scheme']:20s}{r['batch']:6d}{r['prefill_ms']:12.1f}{r['tokens_per_s']:10.0f}"
                     f"{r['tpot_ms']:9.2f}{speedup:>9s}{mem:>9s}")
    for e in result["errors"]:
        lines.append(f"{e['model']:14s}{e['scheme']:20s}{'-' if e['batch'] is None else e['batch']:>6}  "
                     f"FAILED: {e['error'].splitlines()[0][:80]}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    device = result["gpu"] or result.get("device")
    panels = {f"{name}, {device}": {} for name in dict.fromkeys(r["model"] for r in result["rows"])}
    for r in result["rows"]:
        if r["scheme"] != DENSE and r["speedup"] is not None:
            panels[f"{r['model']}, {device}"].setdefault(r["scheme"], []).append((r["batch"], r["speedup"]))
    plot_speedups(path, panels, "batch (sequences)", "decode tokens/s over fp16")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit bench e2e", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama2-7b"], choices=list(MODELS))
    p.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES,
                   help=f"'{DENSE}' (dense baseline) or lowbit schemes, e.g. int4-g128 fp6_e3m2-channel")
    p.add_argument("--batches", nargs="+", type=int, default=DEFAULT_BATCHES)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--decode", choices=DECODE_MODES, default=None,
                   help="decode step: torch.compile reduce-overhead (CUDA default), one hand-captured CUDA graph, "
                        "or eager (CPU default)")
    p.add_argument("--unfused", action="store_true",
                   help="run q, k, v, gate and up as separate linears, as transformers builds LLaMA (default: "
                        "q/k/v and gate/up fused into one linear each, as serving engines run them)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="no measurement: print the table of an earlier run's JSON (and draw --plot)")
    a = p.parse_args(argv)
    if a.replot:
        return replot(p, a.replot, "e2e", a.plot, plot, format_table)
    for s in a.schemes:
        if s != DENSE:
            try:
                Scheme.parse(s)
            except ValueError as e:
                p.error(f"bad scheme {s!r}: {e}")
    if a.gen_len < WARMUP_STEPS + 2:
        p.error(f"--gen-len must be at least {WARMUP_STEPS + 2}")
    if a.prompt_len < 1 or min(a.batches) < 1:
        p.error("--prompt-len and --batches must be positive")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU here: pass --device cpu for a (slow, eager) CPU run")
    if device.type != "cuda" and a.decode in ("compile", "graph"):
        p.error(f"--decode {a.decode} needs a CUDA device")
    result = run(a.models, a.schemes, a.batches, a.prompt_len, a.gen_len, device, a.decode, fused=not a.unfused)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    if a.plot:
        a.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(result, a.plot)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
