"""The main job: accuracy of each scheme on the embedded model (SmolLM2-135M), as a table.

Loads the model once, evaluates it unquantized (the baseline, whose next-token log-probs are kept
as the KL reference), then for each scheme and method quantizes a copy and evaluates it on the
same held-out tokens: perplexity, its change vs the baseline, mean KL(baseline || quantized).

On CPU everything runs in float32 (the baseline row stands for fp16 weights, run in float32); every
method quantizes the linears rounded to float16, so group scales are stored as a float16 checkpoint
would store them. On CUDA the whole model runs in float16.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from pathlib import Path

import torch
from torch import nn

from .. import data
from ..eval import evaluate
from ..nn import QuantLinear, quantize_model, quantized_linears
from ..scheme import Scheme
from .common import run_metadata

DEFAULT_SCHEMES = ["int8-channel", "int4-g128", "int4-g32-asym", "int3-g64", "fp6_e3m2-channel",
                   "fp6_e2m3-channel", "fp5_e2m2-channel", "fp4_e2m1-g32"]
README = "readme"
# The README's table (issue 6): clipping search and GPTQ where GPTQ's targets compare them with RTN;
# act-order too for the per-channel float formats, where it costs nothing (no group scales to reorder).
README_TABLE = ("int8-channel,int4-g128:rtn+clip+gptq+gptq-act,int4-g32-asym,int3-g64:rtn+clip+gptq,"
                "fp6_e3m2-channel:rtn+gptq+gptq-act,fp6_e2m3-channel:rtn+gptq+gptq-act,"
                "fp5_e2m2-channel:rtn+gptq+gptq-act,fp4_e2m1-g32:rtn+gptq")
METHODS = {  # name -> (quantizer, options)
    "rtn": ("rtn", {}),
    "clip": ("rtn", {"clip_search": True}),
    "gptq": ("gptq", {"act_order": False}),
    "gptq-act": ("gptq", {"act_order": True}),
}
BASELINE = "fp16"
# 4096 tokens at seq_len 512 / stride 256 is 15 windows per model: the default run (baseline +
# 8 schemes, RTN) stays well under 15 minutes on 2 CPU cores, and KL is already stable there.
DEFAULT_EVAL_TOKENS = 4096
Q4_1_NOTE = ("Note: the model's released weights are themselves Q4_1 (4-bit, group 32: a float16 scale and a "
             "float16 minimum per group; the linears have at most 16 distinct values per group of 32), so there "
             "is no 16-bit original here and the baseline is those 4-bit values. A scheme with Q4_1's exact grid "
             "would be lossless, but int4-g32-asym is not that grid: its zero point is an integer code, Q4_1's "
             "minimum any float16, so it re-rounds most weights (see its row). The table "
             "compares schemes on this model; it is not the loss from 16-bit weights.")


def _csv(text: str, separator: str = ",") -> list[str]:
    return [item.strip() for item in text.split(separator) if item.strip()]


def _schemes(text: str) -> list[tuple[str, list[str] | None]]:
    """``SCHEME`` or ``SCHEME:M1+M2`` items (``int4-g128-2:4:rtn+gptq`` too) -> (scheme, its own
    methods or None for --methods');
    ``readme`` stands for the README table's rows."""
    out = []
    for item in _csv(text):
        if item == README:
            out.extend(_schemes(README_TABLE))
            continue
        # The scheme grammar's only ':' is its 2:4 flag, so methods follow the last ':' unless it ends the scheme.
        name, colon, methods = (item, "", "") if item.endswith("2:4") else item.rpartition(":")
        if not colon:
            name = item
        if name == BASELINE:  # the baseline row is always there
            continue
        try:
            scheme = str(Scheme.parse(name))
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"{err} (schemes look like int4-g128, int4-g32-asym, fp6_e3m2-channel, "
                "optionally with their methods: int4-g128:rtn+gptq)") from None
        out.append((scheme, _methods(methods, "+") if colon else None))
    return out


def _methods(text: str, separator: str = ",") -> list[str]:
    out = _csv(text, separator)
    unknown = [m for m in out if m not in METHODS]
    if unknown or not out:
        raise argparse.ArgumentTypeError(f"unknown or no method(s) in {text!r}; choose from {', '.join(METHODS)}")
    return out


def planned_rows(schemes: list[tuple[str, list[str] | None]], methods: list[str]) -> list[tuple[str, str]]:
    """(scheme, method) of every quantized row, in order: each scheme with its own methods, else ``methods``."""
    return [(scheme, method) for scheme, own in schemes for method in (own or methods)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schemes", type=_schemes, default=_schemes(",".join(DEFAULT_SCHEMES)), metavar="S1,S2,...",
                   help=f"comma-separated schemes (default: {','.join(DEFAULT_SCHEMES)}), each optionally with its "
                        f"own methods (int4-g128:rtn+gptq); '{README}' = the README table's rows "
                        f"({README_TABLE}); the unquantized baseline row is always included")
    p.add_argument("--methods", type=_methods, default=["rtn"], metavar="M1,M2,...",
                   help=f"comma-separated, a row each for every scheme without its own: {', '.join(METHODS)} "
                        "(default: rtn); clip = RTN with clipping search, gptq-act = GPTQ with act-order")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--markdown", type=Path, metavar="OUT", help="also write the table in Markdown (as in the README)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, metavar="N",
                   help=f"held-out tokens to evaluate (default: {DEFAULT_EVAL_TOKENS}; the whole held-out part "
                        "is ~22k tokens)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16,
                   help="windows per forward pass (default: 16, all windows of the default budget at once: on CPU "
                        "each forward dequantizes every layer, so fewer, larger batches are faster)")
    p.add_argument("--calib-seqs", type=int, default=data.CALIBRATION_SEQS, help="GPTQ calibration sequences")
    p.add_argument("--calib-len", type=int, default=data.CALIBRATION_LEN, help="GPTQ calibration sequence length")


def bits_per_weight(model: nn.Module) -> float:
    """Payload bits per weight over all quantized linears (codes, scales, zero points), weighted by size."""
    layers = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
    weights = sum(qw.out_features * qw.in_features for qw in layers)
    return sum(qw.bits_per_weight * qw.out_features * qw.in_features for qw in layers) / weights


def size_mb(model: nn.Module) -> float:
    """Stored size: quantized linears as stored, every other parameter at 16 bits (as a float16 checkpoint)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    inside = {id(p) for m in quantized for p in m.parameters()}
    total = sum(m.qweight.nbytes + (0 if m.bias is None else 2 * m.bias.numel()) for m in quantized)
    total += sum(2 * p.numel() for p in model.parameters() if id(p) not in inside)  # tied weights count once
    return total / 1e6


def _quantize(model: nn.Module, scheme: str, method: str, calibration, device: torch.device) -> None:
    """Quantize ``model``'s linears in place; every method makes float16 linears (group scales
    float16, as in a float16 checkpoint), so a scheme's bits per weight do not depend on the method."""
    quantizer, options = METHODS[method]
    if quantizer == "rtn":
        for _, linear in quantized_linears(model):
            linear.half()
        quantize_model(model, scheme, progress=True, **options)
    else:
        from ..quantize.gptq import quantize_model_gptq

        quantize_model_gptq(model, scheme, calibration(), device=device, dtype=torch.float16, **options)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    if args.max_eval_tokens < 2:
        raise ValueError(f"--max-eval-tokens must be >= 2, got {args.max_eval_tokens}")
    if args.calib_seqs < 1 or args.calib_len < 2:  # checked here, not after the baseline's evaluation
        raise ValueError(f"GPTQ calibration needs --calib-seqs >= 1 and --calib-len >= 2, "
                         f"got {args.calib_seqs} and {args.calib_len}")
    planned = planned_rows(args.schemes, args.methods)

    print(f"loading the embedded model {data.DEFAULT_MODEL_NAME} ({data.GGUF_FILE}) ...", flush=True)
    model, tokenizer = data.load_default_model(torch.float32)
    # float32 on CPU (no fast float16 CPU matmul to count on); float16 on GPUs, as deployed.
    model = model.to(device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    text_path = data.default_text_path()
    text = data.load_text(text_path)
    tokens = data.eval_tokens(tokenizer, text, max_tokens=args.max_eval_tokens)
    window = dict(seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size)
    print(f"text: {text_path} (held-out part: after the first {data.CALIBRATION_FRACTION:.0%} of its characters)")
    print(f"evaluation budget: {len(tokens)} tokens, seq_len {args.seq_len}, stride {args.stride}; "
          f"{len(planned)} quantized row(s) on {device}")
    print(Q4_1_NOTE, flush=True)

    # GPTQ's calibration sequences, tokenized on first use and shared by every GPTQ row.
    calibration = functools.cache(lambda: data.calibration_tokens(tokenizer, args.calib_seqs, args.calib_len, text))

    t = time.perf_counter()
    base = evaluate(model, tokens, **window, keep_reference=True, desc="baseline")
    baseline_label = "fp16 (float32 run)" if device.type == "cpu" else "fp16"
    rows = [{"scheme": BASELINE, "method": baseline_label, "bits_per_weight": 16.0, "size_mb": size_mb(model),
             "ppl": base.ppl, "ppl_delta_pct": 0.0, "kl": 0.0, "quantize_s": 0.0,
             "eval_s": time.perf_counter() - t}]
    print(_row_line(rows[0]), flush=True)
    for scheme, method in planned:
        qmodel = copy.deepcopy(model)
        if METHODS[method][0] == "gptq":
            calibration()  # tokenized once, outside the timed quantization
        t = time.perf_counter()
        _quantize(qmodel, scheme, method, calibration, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the time of the work, not of its queueing
        quantize_s = time.perf_counter() - t
        print(f"quantized: {scheme} {method} in {quantize_s:.1f} s", flush=True)
        t = time.perf_counter()
        result = evaluate(qmodel, tokens, **window, reference=base.reference, desc=f"{scheme} {method}")
        rows.append({"scheme": scheme, "method": method, "bits_per_weight": bits_per_weight(qmodel),
                     "size_mb": size_mb(qmodel), "ppl": result.ppl,
                     "ppl_delta_pct": 100 * (result.ppl / base.ppl - 1), "kl": result.kl,
                     "quantize_s": quantize_s, "eval_s": time.perf_counter() - t})
        print(_row_line(rows[-1]), flush=True)
        del qmodel
    return {"kind": "accuracy", "model": data.DEFAULT_MODEL_NAME, "text": str(text_path),
            "tokens_evaluated": base.tokens_evaluated, "seq_len": args.seq_len, "stride": args.stride,
            "calibration": {"seqs": args.calib_seqs, "seq_len": args.calib_len},
            **run_metadata(device), "cpu_threads": torch.get_num_threads(),
            "runtime_s": time.perf_counter() - started, "rows": rows}


def _row_line(row: dict) -> str:
    return (f"done: {row['scheme']} {row['method']}: ppl {row['ppl']:.3f} ({row['ppl_delta_pct']:+.2f}%), "
            f"KL {row['kl']:.4f}, quantize {row['quantize_s']:.0f} s, eval {row['eval_s']:.0f} s")


def format_table(report: dict, markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a Markdown table (the README's)."""
    header = ("scheme", "method", "bits/w", "size MB", "perplexity", "delta", "KL", "quantize s")
    lines = [(r["scheme"], r["method"], f"{r['bits_per_weight']:.3f}", f"{r['size_mb']:.1f}", f"{r['ppl']:.3f}",
              f"{r['ppl_delta_pct']:+.2f}%", f"{r['kl']:.4f}", f"{r['quantize_s']:.0f}") for r in report["rows"]]
    if markdown:
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit accuracy", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_and_report(p.parse_args(argv))


def run_and_report(args: argparse.Namespace) -> int:
    report = run(args)
    print()
    print(f"{report['model']} on {report['tokens_evaluated']} tokens of {Path(report['text']).name} "
          f"(seq_len {report['seq_len']}, stride {report['stride']}, {report['device']})")
    print(format_table(report))
    print("bits/w: codes + scales + zero points of the quantized linears (all but lm_head, which is tied to the "
          "embeddings); size: quantized linears as stored + every other parameter at 16 bits; "
          "delta: perplexity change vs the baseline; KL: mean KL(baseline || quantized) per token, nats.")
    if report["device"] == "cpu":
        print("The fp16 baseline is the unquantized model run in float32 on CPU. Every row quantizes the linears "
              "rounded to float16 (float16 group scales, as a float16 checkpoint); GPTQ calibrates in float32.")
    print(Q4_1_NOTE)
    print(f"runtime: {report['runtime_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_table(report, markdown=True) + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
