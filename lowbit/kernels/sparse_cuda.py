"""The CUDA kernel for 2:4 sparse int4 weights on the sparse tensor cores (``sparse24_mma.cu``).

Triton has no sparse matrix instruction: its 2:4 kernel expands the kept values to the dense
operand in registers (13 instructions per 8 dense weights, 1.8-2.1x over fp16 at batch 1-16, below
dense int4). This kernel hands the kept values and their 2-bit positions to ``mma.sp`` instead.

* **Build** at first use: ``nvcc -cubin`` for the device's architecture, cached under
  ``$LOWBIT_CACHE_DIR`` (default ``~/.cache/lowbit``) by source hash; loaded and launched through
  the CUDA driver API (ctypes) on torch's current stream, so CUDA graphs capture it. Without nvcc,
  or where the build fails, :func:`try_matmul` returns None (one warning) and the Triton kernel runs;
  ``LOWBIT_SPARSE_CUDA=0`` (read at a device's first call) does the same without a warning.
* **Weights** are read in place from the ``tiled-planes-v4`` values segment. The positions are
  re-laid out once per weight into the instruction's metadata registers (:func:`mma_metadata`,
  cached on the positions tensor: 1 bit per dense weight of GPU memory on top of the stored 3.13).
* **Scope**: symmetric int4 values, per-channel scales or groups a multiple of 128, fp16/bf16
  activations whose dtype is the group scales', K a multiple of 8; dispatch uses it up to
  :data:`MAX_TOKENS` tokens (:func:`matmul` runs any batch).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import pack as _pack
from .. import sparsity as _sparsity
from ..qweight import QuantizedWeight

__all__ = ["SparseConfig", "MAX_TOKENS", "supports", "heuristic_config", "mma_metadata", "try_matmul", "matmul"]

SOURCE = Path(__file__).with_name("sparse24_mma.cu")
TILE_DENSE_K = 2 * _pack.TILE_K  # a stored k-tile of 128 kept values spans 256 dense inputs
MAX_TOKENS = 16  # dispatch's limit: at 32 tokens the Triton kernel is as fast (bench/NOTES.md, session 12)


# (token blocks, row blocks a warp) the source instantiates: at most 16 accumulator tiles a warp
INSTANCES = ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2))


@dataclass(frozen=True)
class SparseConfig:
    token_blocks: int = 1  # blocks of 8 tokens a program
    row_blocks: int = 1  # 16-row blocks a warp (4 warps a program), sharing each activation fragment
    split_k: int = 1

    def __post_init__(self):
        if (self.token_blocks, self.row_blocks) not in INSTANCES or self.split_k < 1:
            raise ValueError(f"SparseConfig needs (token_blocks, row_blocks) in {INSTANCES} and split_k >= 1, "
                             f"got {self}")


def supports(qw: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether the kernel computes ``x @ qw.T`` for activations of ``dtype``."""
    s = qw.scheme
    group_ok = (s.per_channel and qw.scales.dtype == torch.float32) or (
        not s.per_channel and s.group_size % 128 == 0 and qw.scales.dtype == dtype)
    return (s.sparsity == "2:4" and not s.fmt.is_float and s.bits == 4 and s.symmetric and not s.mx and group_ok
            and dtype in (torch.float16, torch.bfloat16) and qw.in_features % 8 == 0 and qw.scales.is_contiguous()
            and all(t.is_contiguous() for t in qw.packed))


@lru_cache(maxsize=65536)  # called on every matmul
def heuristic_config(m: int, n: int, k: int, sms: int) -> SparseConfig:
    """Token blocks to cover the batch (at most 8), 2 row blocks a warp, split-K to about 4 programs
    per SM: the best or within 4-14 % of the best probed config at 1-16 tokens on the 70B layers
    (H200, session 12; 25-64 % behind past 16 tokens, where dispatch does not use the kernel)."""
    blocks = min(8, 1 << max(0, -(-m // 8) - 1).bit_length())
    programs = -(-_pack.row_blocks(n) // 8) * -(-m // (8 * blocks))
    tiles = -(-k // TILE_DENSE_K)
    split = max(1, min(-(-4 * sms // programs), tiles // 2))
    return SparseConfig(token_blocks=blocks, row_blocks=2, split_k=split)


def _slot_map() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each (lane, register u, nibble slot 0..7) of the metadata: the row offset in the 16-row
    block, the group of the tile it describes, and its bit shift. Steps (h, u): lanes with tig >> 1 == h
    feed them (the instruction's selector h); tig & 1 picks chunks 0-3 or 4-7; nibbles 0-3 (bits 0-15)
    describe row g, 4-7 row g + 8; chunk c < 4 is group 4c + u + 32h, chunk 4 + c group 4c + u + 32h + 16."""
    lane = torch.arange(32).view(32, 1, 1)
    u = torch.arange(4).view(1, 4, 1)
    slot = torch.arange(8).view(1, 1, 8)
    g, tig = lane >> 2, lane & 3
    h, chunk_half = tig >> 1, tig & 1
    chunk = slot % 4 + 4 * chunk_half
    row = g + 8 * (slot // 4)
    group = 4 * (chunk % 4) + u + 32 * h + 16 * (chunk // 4)
    return row.expand(32, 4, 8), group.expand(32, 4, 8), (4 * slot).expand(32, 4, 8)


_METADATA = WeakIdKeyDictionary()  # positions tensor -> (its version, metadata)
_METADATA_CHUNK = 256  # row blocks a pass (4096 rows): bounded temporaries on 70B-sized layers


def mma_metadata(qw: QuantizedWeight) -> torch.Tensor:
    """The ``mma.sp`` metadata of a 2:4 weight: int32 ``[row_blocks, tiles * 128]``, per 16-row block
    and 256-input tile the 4 registers of each of the 32 lanes (lane-major, 512 bytes a tile); each
    4-bit nibble is a group's two positions ``p0 | p1 << 2`` (:func:`_slot_map` says which)."""
    n, k = qw.shape
    stored = qw.scheme.stored_columns(k)
    tiles = _pack.padded_k(stored) // _pack.TILE_K
    blocks = _pack.row_blocks(n)
    out = torch.empty(blocks, tiles * 128, dtype=torch.int32, device=qw.device)
    row, group, shift = (t.to(qw.device) for t in _slot_map())
    for b0 in range(0, blocks, _METADATA_CHUNK):
        b1 = min(blocks, b0 + _METADATA_CHUNK)
        rows = min(n, b1 * _pack.ROW_BLOCK) - b0 * _pack.ROW_BLOCK
        codes = _pack.unpack_codes(tuple(t[b0:b1] for t in qw.packed), qw.scheme.code_bits, stored, rows=rows,
                                   sparse=True)
        p = torch.zeros((b1 - b0) * _pack.ROW_BLOCK, tiles * _pack.TILE_K, dtype=torch.int32, device=qw.device)
        p[:, 1::2] = 1  # padding groups keep positions (0, 1): a valid metadata nibble
        p[:rows, :stored] = _sparsity.split_codes(codes)[1].to(torch.int32)
        nibbles = (p[:, 0::2] | (p[:, 1::2] << 2)).view(b1 - b0, _pack.ROW_BLOCK, tiles, 64)
        picked = nibbles[:, row, :, group].to(torch.int64)  # [32, 4, 8, blocks, tiles]
        regs = (picked << shift[..., None, None]).sum(2)  # disjoint nibbles: sum == or
        regs = torch.where(regs >= 1 << 31, regs - (1 << 32), regs).to(torch.int32)
        out[b0:b1] = regs.permute(2, 3, 0, 1).reshape(b1 - b0, tiles * 128)
    return out


def _cached_metadata(qw: QuantizedWeight) -> torch.Tensor | None:
    """:func:`mma_metadata`, built once per positions tensor and rebuilt in place when that tensor
    changes (so CUDA graphs captured with it read the new positions). None while a CUDA graph is
    being captured and it is not built yet (building allocates and reads the codes)."""
    key = qw.packed[1]
    version = 0 if key.is_inference() else key._version  # (inference tensors keep no version)
    hit = _METADATA.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    if key.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    meta = mma_metadata(qw)
    if hit is not None and hit[1].shape == meta.shape:
        meta = hit[1].copy_(meta)
    _METADATA[key] = (version, meta)
    return meta


# ------------------------------------------------------------------------------------------- build
def _nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE_DIR", Path.home() / ".cache" / "lowbit"))


def _cubin(arch: str) -> bytes:
    """The kernels' cubin for ``arch`` (e.g. ``"90"``), compiled once and cached by source hash."""
    source = SOURCE.read_bytes()
    flags = ["-cubin", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    digest = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    cache = _cache_dir() / f"sparse24-{digest}-sm{arch}.cubin"
    if cache.exists():
        return cache.read_bytes()
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME/bin)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        out = Path(tmp) / "k.cubin"
        done = subprocess.run([nvcc, *flags, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, cache)  # atomic: a concurrent build finds a whole file or none
    return cache.read_bytes()


class _Driver:
    """The few CUDA driver calls the kernel needs (torch's runtime owns the context and streams)."""

    MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3

    def check(self, status: int, what: str) -> None:
        if status:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            raise RuntimeError(f"{what}: CUDA error {status} ({(text.value or b'?').decode()})")

    def load(self, image: bytes) -> ctypes.c_void_p:
        module = ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        return module

    def function(self, module: ctypes.c_void_p, name: str, shared: int) -> ctypes.c_void_p:
        fn = ctypes.c_void_p()
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), f"cuModuleGetFunction {name}")
        self.check(self.lib.cuFuncSetAttribute(fn, self.MAX_DYNAMIC_SHARED, shared), "cuFuncSetAttribute")
        return fn

    def launch(self, fn, grid, block, shared, stream, args) -> None:
        params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        self.check(self.lib.cuLaunchKernel(fn, *grid, *block, shared, stream, params, None), "cuLaunchKernel")


_DRIVER: _Driver | None = None
_MODULES: dict[int, ctypes.c_void_p | Exception] = {}
_FUNCTIONS: dict[tuple[int, str], ctypes.c_void_p] = {}


def _module(index: int) -> ctypes.c_void_p | None:
    """The loaded kernels on device ``index``, or None (warned once) where they cannot be built."""
    global _DRIVER
    if index not in _MODULES:
        try:
            if os.environ.get("LOWBIT_SPARSE_CUDA", "1") == "0":
                raise RuntimeError("disabled by LOWBIT_SPARSE_CUDA=0")
            major, minor = torch.cuda.get_device_capability(index)
            if major < 8:
                raise RuntimeError(f"sm_{major}{minor} has no sparse tensor cores (sm_80+)")
            image = _cubin(f"{major}{minor}")
            _DRIVER = _DRIVER or _Driver()
            with torch.cuda.device(index):  # the device's primary context (torch's) current on this thread
                torch.cuda.synchronize()
                _MODULES[index] = _DRIVER.load(image)
        except (RuntimeError, OSError) as e:
            _MODULES[index] = e
            if os.environ.get("LOWBIT_SPARSE_CUDA", "1") != "0":
                warnings.warn(f"lowbit: the 2:4 CUDA kernel is not available ({e}); 2:4 int4 weights use the "
                              "Triton kernel", RuntimeWarning, stacklevel=3)
    module = _MODULES[index]
    return None if isinstance(module, Exception) else module


def _shared_bytes(cfg: SparseConfig) -> int:
    return 2 * cfg.token_blocks * 8 * 8 * 64  # two stages of 8 steps x 8 tokens x 64 bytes a token block


def _function(index: int, name: str, shared: int) -> ctypes.c_void_p | None:
    module = _module(index)
    if module is None:
        return None
    fn = _FUNCTIONS.get((index, name))
    if fn is None:
        fn = _FUNCTIONS[(index, name)] = _DRIVER.function(module, name, shared)
    return fn


# ------------------------------------------------------------------------------------------ launch
def try_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None,
               cfg: SparseConfig | None = None, out: torch.Tensor | None = None,
               max_tokens: int = MAX_TOKENS) -> torch.Tensor | None:
    """``x [M, K] @ qw.T + bias`` by the kernel, or None where it does not apply (scheme, an empty
    batch or one past ``max_tokens``, no kernel build). During CUDA graph capture it also returns
    None where the kernel or the weight's metadata is not loaded yet (loading cannot run inside a
    capture): run a call before capturing, as warm-up does, or the graph keeps the Triton kernel."""
    if not (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= max_tokens and supports(qw, x.dtype)):
        return None
    if x.shape[1] != qw.in_features or x.device != qw.device:
        raise ValueError(f"x must be [M, {qw.in_features}] on {qw.device}, got {tuple(x.shape)} on {x.device}")
    x = x.contiguous()
    if x.data_ptr() % 8:  # 8-byte copies of four inputs
        return None
    from .dispatch import _cuda_index, _num_sms

    index = _cuda_index(x.device)
    cfg = cfg or heuristic_config(x.shape[0], qw.out_features, qw.in_features, _num_sms(x.device))
    kind = "channel" if qw.scheme.per_channel else "group"
    dt = "f16" if x.dtype == torch.float16 else "bf16"
    name = f"sparse24_int4_{dt}_mt{cfg.token_blocks}_r{cfg.row_blocks}_{kind}"
    if (index, name) not in _FUNCTIONS and torch.cuda.is_current_stream_capturing():
        return None
    fn = _function(index, name, _shared_bytes(cfg))
    meta = None if fn is None else _cached_metadata(qw)
    if meta is None:
        return None
    if index == torch.cuda.current_device():
        return _launch(fn, x, qw, meta, bias, cfg, out)
    with torch.cuda.device(index):  # the function belongs to that device's context
        return _launch(fn, x, qw, meta, bias, cfg, out)


def matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
           cfg: SparseConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`try_matmul` at any batch, raising where the kernel does not apply (tests and benchmarks)."""
    y = try_matmul(x, qw, bias, cfg, out, max_tokens=x.shape[0])
    if y is None:
        raise RuntimeError(f"the 2:4 CUDA kernel does not apply to {qw.scheme} with {x.dtype} x {tuple(x.shape)} "
                           f"(or is not available on this machine)")
    return y


def _launch(fn, x, qw, meta, bias, cfg: SparseConfig, out) -> torch.Tensor:
    from .dispatch import _counters

    m, k = x.shape
    n = qw.out_features
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride() != (n, 1) or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous {x.dtype} [{m}, {n}] tensor, got {out.dtype} {tuple(out.shape)} "
                         f"strides {out.stride()}")
    bias = None if bias is None else bias.to(x.dtype).contiguous()  # (held until the launch is queued)
    tiles = meta.shape[1] // 128
    per_split = -(-tiles // min(cfg.split_k, tiles))
    split = -(-tiles // per_split)  # no empty split
    blocks = _pack.row_blocks(n)
    grid = (-(-blocks // (4 * cfg.row_blocks)), split, -(-m // (8 * cfg.token_blocks)))
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else None
    counters = _counters(x.device, grid[0] * grid[2]) if split > 1 else None
    values = qw.packed[0]
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    args = [ptr(x.data_ptr()), ptr(values.data_ptr()), i64(values.stride(0) // 8), ptr(meta.data_ptr()),
            i64(meta.stride(0) // 4), ptr(qw.scales.data_ptr()), ptr(0 if bias is None else bias.data_ptr()),
            ptr(out.data_ptr()), ptr(0 if partial is None else partial.data_ptr()),
            ptr(0 if counters is None else counters.data_ptr()), i32(m), i32(n), i32(k),
            i32(per_split), i32(tiles), i32(max(qw.scheme.group_size, 1)), i32(qw.num_groups), i32(blocks)]
    stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
    _DRIVER.launch(fn, grid, (128, 1, 1), _shared_bytes(cfg), stream, args)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit.kernels.sparse_cuda [--arch 90 ...]``: build the cubin(s) into the cache ahead
    of first use (a deployment step, or on a machine with nvcc for one without it)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lowbit.kernels.sparse_cuda", description=main.__doc__)
    p.add_argument("--arch", nargs="+", default=None,
                   help="compute capabilities without the dot, e.g. 80 90 (default: the visible GPUs')")
    a = p.parse_args(argv)
    archs = a.arch or sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not archs:
        p.error("no GPU visible: name the architectures with --arch")
    for arch in archs:
        try:
            image = _cubin(arch)
        except RuntimeError as e:
            print(f"sm_{arch}: {e}")
            return 1
        print(f"sm_{arch}: {len(image)} bytes in {_cache_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
