"""The ``lowbit`` command line: quantize, eval, info, convert, bench, tune, accuracy.

Bad input (an invalid scheme, a missing file, a corrupt checkpoint: a ValueError, TypeError,
FileNotFoundError, FileExistsError or NotImplementedError raised by lowbit's own code) prints one
line to stderr and exits with status 2; only unexpected failures show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

import torch

from .scheme import Scheme

# Subcommands whose arguments belong to another module's own parser: everything after them is forwarded.
FORWARDED = {("bench", "layers"): "lowbit.bench.layers", ("bench", "e2e"): "lowbit.bench.e2e",
             ("tune",): "lowbit.kernels.tune"}
SCHEME_FORMS = ("FORMAT-gG or FORMAT-channel, optionally -asym (integers), -mx, -2:4; FORMAT is int2..int8, fpN_eEmM, "
                "fp6, fp5, fp4 or fp8: e.g. int4-g128, int4-g32-asym, int8-channel, fp6_e3m2-channel")
LOWBIT_DIR = Path(__file__).resolve().parent
DTYPES = ["auto", "float16", "bfloat16", "float32"]


def _scheme(text: str) -> Scheme:
    try:
        return Scheme.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}. Allowed forms: {SCHEME_FORMS}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available")
    return text


# -- quantize ------------------------------------------------------------------------------------

def cmd_quantize(args) -> int:
    from . import data
    from .io.checkpoint import save_quantized
    from .nn import quantize_model

    if args.act_order and args.method != "gptq":
        raise ValueError("--act-order needs --method gptq")
    if Path(args.src).is_dir() and data.is_lowbit_checkpoint(Path(args.src)):
        raise ValueError(f"{args.src} is already a lowbit checkpoint; quantize its unquantized source instead")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        # checked again by save_quantized; here so that no time is spent quantizing first
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = data.load_model(args.src, dtype=dtype, device=args.device)
    if args.method == "gptq":
        from .quantize.gptq import quantize_model_gptq

        if tokenizer is None:
            raise FileNotFoundError(f"{args.src} holds no tokenizer, which GPTQ needs for its calibration text")
        calibration = data.calibration_tokens(tokenizer, args.calib_seqs, args.calib_len)
        print(f"GPTQ calibration: {calibration.shape[0]} x {calibration.shape[1]} tokens of {data.default_text_path()}")
        quantize_model_gptq(model, args.scheme, calibration, exclude=args.exclude, act_order=args.act_order,
                            clip_search=args.clip_search, device=args.device)
    else:
        quantize_model(model, args.scheme, exclude=args.exclude, clip_search=args.clip_search)
    out = save_quantized(model, args.out, overwrite=args.overwrite)
    if tokenizer is not None:  # so `lowbit eval OUT` needs nothing else
        tokenizer.save_pretrained(out)
    layers = _quantized_layers(model)
    print(f"wrote {out}: {len(layers)} linears quantized to {args.scheme} ({args.method}"
          f"{', clip search' if args.clip_search else ''}{', act-order' if args.act_order else ''}), "
          f"{_bits_per_weight(layers):.3f} bits per weight, {_tensor_bytes_on_disk(Path(out)) / 1e6:.1f} MB")
    return 0


# -- eval ----------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from . import data
    from .eval import evaluate

    text = data.load_text(args.text)  # before the (slow) model load: a bad path fails at once
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = data.load_model(args.model, dtype=dtype, device=args.device)
    if args.tokenizer:
        tokenizer = data.load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} holds no tokenizer: pass --tokenizer with the original model")
    if args.text:
        tokens = data.tokenize(tokenizer, text, args.max_tokens)
        source = f"{args.text} (whole file)"
    else:
        tokens = data.eval_tokens(tokenizer, text, max_tokens=args.max_tokens)
        source = f"{data.default_text_path()} (held-out part)"
    reference = data.load_model(args.ref, dtype=dtype, device=args.device)[0] if args.ref else None
    result = evaluate(model, tokens, args.seq_len, args.stride, args.batch_size, reference=reference)
    print(f"text: {source}; seq_len {args.seq_len}, stride {args.stride}")
    print(f"tokens evaluated: {result.tokens_evaluated}")
    print(f"perplexity: {result.ppl:.4f}  (mean NLL {result.nll:.4f} nats)")
    if result.kl is not None:
        print(f"mean KL({args.ref} || {args.model}): {result.kl:.5f} nats per token")
    return 0


# -- info ----------------------------------------------------------------------------------------

def _quantized_layers(model):
    from .nn import QuantLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def _bits_per_weight(layers) -> float:
    """Over all quantized layers, weighted by their number of weights."""
    weights = sum(m.in_features * m.out_features for _, m in layers)
    return sum(m.qweight.bits_per_weight * m.in_features * m.out_features for _, m in layers) / max(weights, 1)


def _tensor_bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def cmd_info(args) -> int:
    from . import data
    from .io.checkpoint import load_quantized

    path = Path(args.dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if not data.is_lowbit_checkpoint(path):
        raise ValueError(f"{path} is not a lowbit checkpoint (config.json has no quantization_config with "
                         "quant_method 'lowbit')")
    layers = _quantized_layers(load_quantized(path))
    reference = dict(data.load_model(args.ref)[0].named_modules()) if args.ref else None
    schemes = {}
    for _, m in layers:
        schemes[str(m.scheme)] = schemes.get(str(m.scheme), 0) + 1
    print(f"checkpoint: {path}")
    print(f"scheme(s): {', '.join(f'{s} ({n} layers)' for s, n in schemes.items())}")
    print(f"tensor files on disk: {_tensor_bytes_on_disk(path) / 1e6:.2f} MB")
    print(f"bits per weight (quantized layers): {_bits_per_weight(layers):.3f}")
    header = "layer", "scheme", "out x in", "bits/w"
    rows = []
    for name, m in layers:
        row = [name, str(m.scheme), f"{m.out_features} x {m.in_features}", f"{m.qweight.bits_per_weight:.3f}"]
        if reference is not None:
            row.append(f"{_relative_error(name, m, reference):.5f}")
        rows.append(row)
    if reference is not None:
        header += ("rel. error",)
        print(f"rel. error: ||W - dequantize|| / ||W|| against {args.ref}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for row in [list(header)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _relative_error(name: str, layer, reference: dict) -> float:
    ref = reference.get(name)
    weight = getattr(ref, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"the reference model has no weight of shape {(layer.out_features, layer.in_features)} "
                         f"at {name}")
    w = weight.detach().to(device=layer.scales.device, dtype=torch.float32)
    return (torch.linalg.norm(w - layer.qweight.dequantize(torch.float32)) / torch.linalg.norm(w)).item()


# -- convert, accuracy, forwarded ------------------------------------------------------------------

def cmd_convert(args) -> int:
    from .io.importers import convert

    print(f"wrote {convert(args.src, args.dir)}")
    return 0


def cmd_accuracy(args) -> int:
    from .bench import accuracy

    return accuracy.run_and_report(args)


def _forwarded_module(argv: list[str]) -> tuple[str, list[str]] | None:
    for prefix, module in FORWARDED.items():
        if tuple(argv[:len(prefix)]) == prefix:
            return module, argv[len(prefix):]
    return None


def build_parser() -> argparse.ArgumentParser:
    from . import data
    from .bench import accuracy

    p = argparse.ArgumentParser(prog="lowbit", description="Low-bit LLM weights: quantize, evaluate, inspect.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and save a lowbit checkpoint",
                       description="Quantize SRC ('default' for the embedded SmolLM2-135M, a .gguf file or a "
                                   "Hugging Face model directory) and save a lowbit checkpoint with its tokenizer.")
    q.add_argument("src")
    q.add_argument("--scheme", type=_scheme, required=True, help=SCHEME_FORMS)
    q.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    q.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    q.add_argument("--clip-search", action="store_true", help="shrink each group's range to minimize its error")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation energy")
    q.add_argument("--exclude", nargs="+", action="extend", default=["lm_head"], metavar="NAME",
                   help="linears to leave unquantized, in addition to lm_head (a name, its last part or a prefix)")
    q.add_argument("--calib-seqs", type=_positive_int, default=data.CALIBRATION_SEQS,
                   help=f"GPTQ calibration sequences, from the embedded text (default: {data.CALIBRATION_SEQS})")
    q.add_argument("--calib-len", type=_positive_int, default=data.CALIBRATION_LEN,
                   help=f"their length in tokens (default: {data.CALIBRATION_LEN})")
    q.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="cast the model before quantizing; fixes the stored scales' and other tensors' dtype "
                        "(auto: as stored; GGUF files load as float32)")
    q.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or auto (GPTQ is much faster on a GPU)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    q.set_defaults(handler=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity (and KL vs a reference) on held-out text",
                       description="Sliding-window perplexity of a model (a lowbit checkpoint, a Hugging Face "
                                   "directory, a .gguf file or 'default'); with --ref also the mean KL divergence "
                                   "of next-token distributions vs that reference.")
    e.add_argument("model", metavar="DIR_OR_SRC")
    e.add_argument("--text", type=Path, help="text file to evaluate, whole (default: the held-out part of the "
                                             "embedded text, disjoint from GPTQ's calibration part)")
    e.add_argument("--ref", metavar="SRC", help="reference model for KL, e.g. the unquantized source")
    e.add_argument("--seq-len", type=_positive_int, default=512)
    e.add_argument("--stride", type=_positive_int, default=256)
    e.add_argument("--max-tokens", type=_positive_int, help="evaluate only the first N tokens")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass")
    e.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the unquantized tensors (embeddings, norms; all of an unquantized model): auto "
                        "keeps them as stored; float32 is faster and exact on CPU")
    e.add_argument("--tokenizer", metavar="SRC", help="where to read the tokenizer if DIR_OR_SRC has none")
    e.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or auto")
    e.set_defaults(handler=cmd_eval)

    i = sub.add_parser("info", help="schemes, size and per-layer bits (or errors) of a lowbit checkpoint")
    i.add_argument("dir")
    i.add_argument("--ref", metavar="SRC",
                   help="the unquantized model: adds each layer's relative error ||W - dequantize|| / ||W||")
    i.set_defaults(handler=cmd_info)

    c = sub.add_parser("convert", help="convert a GPTQ / AWQ / compressed-tensors checkpoint to lowbit's")
    c.add_argument("src")
    c.add_argument("dir")
    c.set_defaults(handler=cmd_convert)

    # Listed for `lowbit --help` and `lowbit bench --help`; their arguments go to the modules' own parsers.
    b = sub.add_parser("bench", help="GPU benchmarks: `lowbit bench layers --help`, `lowbit bench e2e --help`")
    b.add_argument("target", choices=["layers", "e2e"])
    sub.add_parser("tune", help="tune the kernels' launch configurations: `lowbit tune --help`")

    a = sub.add_parser("accuracy", help="the main job: accuracy table of schemes on the embedded model",
                       description=accuracy.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy.add_arguments(a)
    a.set_defaults(handler=cmd_accuracy)
    return p


def _raised_by_lowbit(err: BaseException) -> bool:
    """True when the innermost frame of the traceback is lowbit's own code (a deliberate check)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(LOWBIT_DIR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        forwarded = _forwarded_module(argv)
        if forwarded is not None:
            module, rest = forwarded
            return importlib.import_module(module).main(rest)
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        # (CheckpointError is a ValueError)
        if not _raised_by_lowbit(err):
            raise
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as err:  # argparse: --help (0) or a usage error (2), its message already printed
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        raise
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("lowbit."):
            raise
        print(f"lowbit: error: {err.name} is not part of this lowbit installation", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
