"""Shared benchmark machinery: layer sets, random quantized weights, CUDA-graph timing, run metadata."""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .. import pack as _pack
from .. import sparsity as _sparsity
from ..qweight import QuantizedWeight
from ..quantize.rtn import build, scale_storage_dtype
from ..scheme import Scheme

# (name, in_features K, out_features N) of one transformer block.
LAYER_SETS = {
    "llama2-7b": [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096)],
    "llama2-70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
}


def load_result(path: Path, kind: str) -> dict:
    """A benchmark result written with ``--json`` (``"kind": kind``); ValueError naming the file if it
    cannot be read, is not JSON, or is another kind of result."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable benchmark JSON ({e})") from None
    found = result.get("kind") if isinstance(result, dict) else None
    if found != kind:
        raise ValueError(f"{path}: expected a `lowbit bench {kind}` result, found kind {found!r}")
    return result


def replot(parser, path: Path, kind: str, plot_path: Path | None, plot, format_table) -> int:
    """``--replot``: print the table of an earlier ``kind`` result (and draw ``plot_path``), no
    measurement; an unreadable or wrong-kind file is the parser's usage error."""
    try:
        result = load_result(path, kind)
    except ValueError as e:
        parser.error(str(e))
    if plot_path:
        plot(result, plot_path)
    print(format_table(result))
    return 0


def plot_speedups(path: Path, panels: dict, xlabel: str, ylabel: str) -> None:
    """One panel per title of ``panels`` ({title: {curve label: [(x, speedup), ...]}}): speedup
    against a log2 x axis, with the 1x line; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 4.5), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for label, pts in curves.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """``|y - reference| / |reference|`` (Frobenius), in float32: how the benchmark and the tuner
    check a kernel's output against ``x @ dequantize().T``."""
    return float((y.float() - reference).norm() / reference.norm())


def random_qweight(scheme, n: int, k: int, dtype: torch.dtype, device) -> QuantizedWeight:
    """A QuantizedWeight with uniformly random codes and realistic random scales (no quantizer run),
    built directly on ``device``: what a benchmark needs, fast even for 70B-sized layers."""
    scheme = Scheme.parse(scheme)
    fmt = scheme.fmt
    codes = torch.randint(0, 1 << fmt.bits, (n, k), dtype=torch.uint8, device=device)
    if fmt.is_float and fmt.exp_bits == 4 and fmt.man_bits == 3:  # e4m3fn: never a NaN code
        codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes)
    groups = 1 if scheme.per_channel else -(-k // scheme.group_size)
    sd = scale_storage_dtype(scheme, dtype)
    if sd == torch.uint8:
        scales = torch.randint(118, 124, (n, groups), dtype=torch.uint8, device=device)
    else:
        scales = (torch.rand(n, groups, device=device) * 0.02 + 0.001).to(sd)
    zeros = None if scheme.symmetric else torch.randint(0, 1 << fmt.bits, (n, groups), dtype=torch.uint8,
                                                        device=device)
    keep = _sparsity.keep_mask(torch.rand(n, k, device=device)) if scheme.sparsity else None  # random 2:4 mask
    return build(scheme, codes, scales, zeros, dtype, keep=keep)


def clone_qweight(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.scheme, qw.shape, tuple(t.clone() for t in qw.packed), qw.scales.clone(),
                           None if qw.zeros is None else qw.zeros.clone(), None, qw.dtype)


def copies_for(bytes_per_copy: int, device) -> int:
    """How many copies of a weight to rotate over so their total exceeds 3x the L2 cache."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, math.ceil(3 * l2 / max(bytes_per_copy, 1)) + 1)


def rotated_copies(qw: QuantizedWeight) -> list[QuantizedWeight]:
    """``qw`` and enough fresh copies of it that a pass over them all spans more than 3x the L2 cache
    (timed calls rotate over them, so every weight read comes from DRAM)."""
    return [qw] + [clone_qweight(qw) for _ in range(copies_for(qw.nbytes, qw.device) - 1)]


def graph_time_us(calls, replays: int = 25, min_calls: int = 8, settle_ms: float = 100.0) -> float:
    """Median microseconds per call of ``calls`` (closures, e.g. one per rotated weight copy),
    captured once in a CUDA graph and replayed ``replays`` times, after ``settle_ms`` of untimed
    replays: the GPU's clock follows its power draw (H200: 1980 MHz after light work, 1470 after a
    compute-bound prefill), and latency-bound kernels follow the clock (int4 decode 67 -> 90 us,
    bench/NOTES.md), so each case is timed at its own steady state, not its predecessor's."""
    for f in calls:  # compile and warm up outside the capture
        f()
    torch.cuda.synchronize()
    seq = [calls[i % len(calls)] for i in range(max(min_calls, len(calls)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in seq:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in seq:
            f()
    settle_start = time.perf_counter()
    while True:  # at least one replay: the first launch of a graph costs extra
        graph.replay()
        torch.cuda.synchronize()
        if time.perf_counter() - settle_start >= settle_ms / 1000:
            break
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(seq))
    del graph
    return statistics.median(times)


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written), the memory roofline."""
    a = torch.randn(nbytes // 8, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    us = graph_time_us([lambda: b.copy_(a)], replays=20, min_calls=4)
    return 2 * a.numel() * a.element_size() / us / 1e3


def read_bandwidth_gbs(device, nbytes: int = 1 << 30) -> float:
    """Measured read bandwidth, the roofline of a kernel that reads its weights once and writes
    almost nothing: the faster of a sum over ``nbytes`` and cuBLAS's product of one fp16 row with a
    ``nbytes`` matrix (both read-only; a copy also writes, so its rate understates this one)."""
    a = torch.randn(nbytes // 2, dtype=torch.float16, device=device)
    sum_us = graph_time_us([lambda: a.sum(dtype=torch.float32)], replays=20, min_calls=4)
    w = a.view(16384, -1)
    x = torch.randn(1, w.shape[1], dtype=torch.float16, device=device)
    gemv_us = graph_time_us([lambda: x @ w.T], replays=20, min_calls=4)
    return nbytes / min(sum_us, gemv_us) / 1e3


def run_metadata(device) -> dict:
    commit = os.environ.get("LOWBIT_COMMIT")  # where the tree runs without its git history (a lent GPU)
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).resolve().parents[2], timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"gpu": gpu, "device": device.type, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "commit": commit, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "layout": _pack.LAYOUT}
