"""``lowbit tune``: measure kernel configs on this GPU and write the table the dispatcher ships.

For each (layer shape, batch M, bits, scale kind, activation dtype: ``--dtype``) it times
candidate configs with the same method as the benchmark (CUDA-graph replay, weights rotated over
> 3x L2) by coordinate descent (split-K, then pipeline depth, then tile sizes and warps) from the
fastest of a few starts (the heuristic config, the entry being replaced, split-free seeds), also
times dequantize + cuBLAS, then times the fastest few again on fresh weight copies and keeps the
lowest median (one kernel's time moved by up to 17 % between two sets of copies on the H200: a
single timing picks luck); a config whose output is not within 1e-2 of the exact reference is
never kept. Writes ``lowbit/kernels/configs/<gpu>.json`` (merged with existing entries, rewritten
after every entry) or ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from triton.runtime.errors import OutOfResources, PTXASError

from ..scheme import Scheme
from ..bench.common import (LAYER_SETS, graph_time_us, random_qweight, relative_error, rotated_copies,
                            run_metadata)
from . import dispatch
from .dispatch import KernelConfig

DEFAULT_BATCHES = [1, 8, 16, 32, 64, 128, 256, 512, 1024]
FINALISTS = 3  # configs timed again, all of them on each of ...
CONFIRMATIONS = 2  # ... this many fresh sets of weight copies


def _time(qws, x, cfg: KernelConfig, replays: int) -> float:
    # Triton prints a failed ptxas run's whole PTX to stdout: held back, and dropped where one
    # line says why; anything else printed meanwhile is passed on.
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            return graph_time_us([lambda q=q: dispatch.matmul(x, q, None, config=cfg) for q in qws], replays)
    except (OutOfResources, PTXASError) as e:  # too much shared memory, or a register cap below the tile's need
        held = None
        lines = str(e).splitlines()
        reason = next((l for l in lines if "fatal" in l), lines[0] if lines else type(e).__name__)
        tqdm.write(f"    {cfg}: {reason[:120]}")
        return float("inf")
    finally:
        if held is not None:
            sys.stdout.write(held.getvalue())


def _neighbours(cfg: KernelConfig, m: int, k_tiles: int, merge_axis: bool):
    """Configs one step from ``cfg`` along each axis (``merge_planes`` only where it changes the
    kernel), but none with a register cap ptxas refuses."""
    return (c for c in _steps(cfg, m, k_tiles, merge_axis) if _cap_fits(c))


def _cap_fits(cfg: KernelConfig) -> bool:
    """False for a register cap at most twice the tile's fp32 accumulators a thread: ptxas refused
    every such config in session 11 (24 of 24, each after a second or more of compiling), and no
    tuned entry is near one (the shipped caps hold 4-16 accumulators a thread under 64 or 80)."""
    return cfg.maxnreg is None or cfg.block_n * cfg.block_m < 32 * cfg.num_warps * cfg.maxnreg // 2


def _steps(cfg: KernelConfig, m: int, k_tiles: int, merge_axis: bool):
    def variant(**kw):
        return dataclasses.replace(cfg, **kw)

    for s in (cfg.split_k // 2, cfg.split_k * 2, cfg.split_k * 3 // 2):
        if 1 <= s <= min(32, k_tiles) and s != cfg.split_k:
            yield variant(split_k=s)
    for st in (cfg.num_stages - 1, cfg.num_stages + 1):
        if 2 <= st <= 7:
            yield variant(num_stages=st)
    for bn in (cfg.block_n // 2, cfg.block_n * 2):
        if 32 <= bn <= 256:
            yield variant(block_n=bn)
    for cap in (None, 80, 64):  # a register cap: more programs per SM, some spills
        if cap != cfg.maxnreg:
            yield variant(maxnreg=cap)
    if merge_axis:
        yield variant(merge_planes=not cfg.merge_planes)
    for w in (2, 4, 8):  # 2 warps (or 32-row tiles) give mma.sync, which Triton does not serialize
        if w != cfg.num_warps:
            yield variant(num_warps=w)
    # token tiles: up to 256 (prefill), never wider than the batch needs
    for bm in (cfg.block_m // 2, cfg.block_m * 2):
        if (16 if cfg.swap_ab else 32) <= bm <= min(256, max(16, 1 << (m - 1).bit_length())):
            yield variant(block_m=bm)


def confirm(seen: dict, retime) -> tuple[KernelConfig, float]:
    """The config of lowest median time among the ``FINALISTS`` fastest of ``seen`` (config -> us),
    timed ``CONFIRMATIONS`` more times by ``retime(finalists)`` (-> {config: us}, on one set of copies)."""
    finalists = sorted(seen, key=seen.get)[:FINALISTS]
    times = {cfg: [seen[cfg]] for cfg in finalists}
    for _ in range(CONFIRMATIONS):
        for cfg, us in retime(finalists).items():
            times[cfg].append(us)
    best = min(finalists, key=lambda cfg: statistics.median(times[cfg]))
    return best, statistics.median(times[best])


def tune_one(qw, m: int, replays: int, rounds: int = 3) -> tuple[KernelConfig, float, dict]:
    """The fastest right config for ``qw`` at ``m`` tokens, its confirmed median microseconds, and
    ``heuristic_us`` / ``shipped_us``: the first timings of the heuristic's config (its prefill tiles
    where the heuristic is dequantize + cuBLAS) and of what dispatch ran before this run."""
    device = qw.device
    qws = rotated_copies(qw)
    x = torch.randn(m, qw.in_features, dtype=qw.dtype, device=device)
    reference = torch.nn.functional.linear(x.float(), qw.dequantize(torch.float32))
    k_tiles = -(-qw.in_features // 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    best = dispatch.heuristic_config(m, qw.out_features, qw.in_features, qw.scheme.bits, sms,
                                     dispatch.narrow_zero_groups(qw.scheme.symmetric, qw.scheme.group_size))
    if best.path == "dequant":  # the fused kernel at its prefill tiles is a candidate too
        best = dispatch.PREFILL_FUSED

    def measure(cfg: KernelConfig) -> float:
        """Microseconds of ``cfg``; inf unless it runs here and its output is right."""
        us = _time(qws, x, cfg, replays)
        if us != float("inf"):
            err = relative_error(dispatch.matmul(x, qw, None, config=cfg), reference)
            if not err < 1e-2:
                tqdm.write(f"    {cfg}: relative error {err:.2e}, not a candidate")
                return float("inf")
        return us

    seen: dict[KernelConfig, float] = {}

    def add(cfg: KernelConfig) -> None:
        if cfg not in seen:
            seen[cfg] = measure(cfg)

    add(best)
    # What dispatch runs now (the entry this run replaces, else the heuristic) is a start too: a
    # retune can take another descent path and must not ship a slower config than it replaces.
    shipped = dispatch.choose_config(m, qw, device, qw.dtype)
    if shipped.path == "fused":  # dequantize + cuBLAS has no neighbours: it is timed last
        add(shipped)
    if m > 16:  # the other orientation is a candidate too
        add(dataclasses.replace(best, swap_ab=not best.swap_ab,
                                block_m=(128 if m > 128 else 64) if best.swap_ab else max(16, min(64, m)),
                                num_warps=8 if best.swap_ab else 4))
    if best.split_k > 1:
        # Split-free seeds: one step per axis from the heuristic's split-K rarely reaches them, and
        # their kernels skip the partials' round trips to L2 (part of a ~5 us fixed cost a kernel).
        for block_n, warps in ((64, 4), (32, 2)):
            add(dataclasses.replace(best, split_k=1, block_n=block_n, num_warps=warps, num_stages=4))
    for _ in range(rounds):
        current = min(seen, key=seen.get)
        for cand in _neighbours(current, m, k_tiles, dispatch.merges_planes(qw)):
            add(cand)
        if min(seen, key=seen.get) == current:
            break
    dequant = KernelConfig(path="dequant")
    add(dequant)
    heuristic_us, tried = seen[best], len(seen)
    shipped_us = seen[shipped if shipped.path == "fused" else dequant]
    del qws

    def retime(finalists: list) -> dict:
        copies = rotated_copies(qw)
        return {cfg: _time(copies, x, cfg, replays) for cfg in finalists}

    measured = {cfg: us for cfg, us in seen.items() if us != float("inf")}
    if not measured:
        raise RuntimeError(f"{qw.scheme} {qw.out_features}x{qw.in_features} M={m}: no config ran with a right result")
    best, us = confirm(measured, retime)
    return best, us, {"heuristic_us": _finite(heuristic_us), "shipped_us": _finite(shipped_us), "tried": tried}


def _finite(us: float) -> float | None:
    """``us``, or None for a config that failed to run or gave a wrong result (the table stays
    plain JSON: no Infinity)."""
    return us if us != float("inf") else None


def _text(us: float | None) -> str:
    return "failed" if us is None else f"{us:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit tune", description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(LAYER_SETS), choices=list(LAYER_SETS))
    p.add_argument("--schemes", nargs="+", default=["int4-g128", "int8-channel"],
                   help="one scheme per (bits, scale kind) the table should cover")
    layer_names = sorted({name for layers in LAYER_SETS.values() for name, *_ in layers})
    p.add_argument("--layers", nargs="+", choices=layer_names, help="only these layers of each set (default: all)")
    p.add_argument("--batches", nargs="+", type=int, default=DEFAULT_BATCHES)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--replays", type=int, default=15)
    p.add_argument("--out", type=Path, help="default: lowbit/kernels/configs/<gpu>.json (merged)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    for scheme in a.schemes:
        if Scheme.parse(scheme).sparsity:
            p.error(f"{scheme}: 2:4 schemes have no tuned entries (their kernels use the heuristic)")
    device = torch.device("cuda")
    out = a.out or dispatch.CONFIG_DIR / f"{dispatch._gpu_slug(device)}.json"
    data = json.loads(out.read_text()) if out.exists() else {"entries": []}
    entries = {json.dumps(e["key"], sort_keys=True): e for e in data["entries"]}
    dtype = getattr(torch, a.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = [(set_name, layer, k, n) for set_name in a.sets for layer, k, n in LAYER_SETS[set_name]
              if not a.layers or layer in a.layers]
    bar = tqdm(total=len(a.schemes) * len(layers) * len(a.batches), desc="tune", unit="entry")
    for scheme in a.schemes:
        for set_name, layer, k, n in layers:
            qw = random_qweight(scheme, n, k, dtype, device)
            for m in a.batches:
                bar.set_postfix_str(f"{scheme} {set_name}/{layer} M={m}")
                cfg, us, info = tune_one(qw, m, a.replays)
                key = dispatch.table_key(m, qw, dtype)
                entries[json.dumps(key, sort_keys=True)] = {"key": key, "config": dataclasses.asdict(cfg),
                                                            "us": us, **info}
                tqdm.write(f"{scheme} {set_name}/{layer} M={m}: {us:.1f} us (heuristic {_text(info['heuristic_us'])}, "
                           f"shipped {_text(info['shipped_us'])}, {info['tried']} tried) {cfg}")
                sys.stdout.flush()  # a run cut short by a time limit keeps its log lines too
                _write_table(out, device, entries)  # after every entry: a run cut short keeps them
                bar.update()
            del qw
            torch.cuda.empty_cache()
    bar.close()
    print(f"wrote {out}")
    return 0


def _write_table(out: Path, device, entries: dict) -> None:
    """The table, replaced atomically (the dispatcher never reads half a file)."""
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**run_metadata(device),
                               "entries": sorted(entries.values(), key=lambda e: json.dumps(e["key"], sort_keys=True))},
                              indent=1))
    tmp.replace(out)
    dispatch.tuned_table.cache_clear()
    dispatch._choose.cache_clear()


if __name__ == "__main__":
    raise SystemExit(main())
