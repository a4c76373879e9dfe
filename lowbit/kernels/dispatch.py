"""Kernel choice and launch for ``lowbit.matmul`` on a GPU (or the Triton interpreter).

The path and launch configuration come from the shape alone (no tuning at call time, no host
sync), so calls are safe inside ``torch.compile`` and CUDA graph capture:

0. 2:4 sparse int4 weights (symmetric, groups of 128k or per-channel, up to 16 tokens): the CUDA
   kernel on the sparse tensor cores (:mod:`.sparse_cuda`), where it is built; otherwise as below;
1. a tuned table shipped per GPU name (``configs/<gpu>.json``, written by ``lowbit tune``),
   matched on (bits, group kind, N, K), the batch bucket and the activation dtype (an entry tuned
   in float16 serves bfloat16 where no bfloat16 entry exists);
2. otherwise :func:`heuristic_config`.

A config either runs the fused kernel or, for large batches, dequantizes the weight once and
calls cuBLAS (``path == "dequant"``), whichever the table measured faster.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import triton.language as tl

from .. import pack as _pack
from ..qweight import QuantizedWeight
from ..scheme import Scheme
from . import sparse_cuda
from .decoders import e4m3_fp16_asm, int4_words_asm, int8_fp16_asm, planes_asm, sparse_asm_supported
from .triton_matmul import lowbit_dequant_kernel, lowbit_matmul_kernel

__all__ = ["KernelConfig", "PREFILL_FUSED", "matmul", "fused_matmul", "dequantize", "x_sums", "choose_config",
           "heuristic_config", "merges_planes"]

CONFIG_DIR = Path(__file__).parent / "configs"
# float32: only the dequantization kernel (float32 activations multiply a dequantized weight).
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _cdiv(a: int, b: int) -> int:  # not triton.cdiv: a constexpr function, ~2 us a call from Python (H200 host)
    return -(-a // b)


def _next_power_of_2(v: int) -> int:
    return 1 << (v - 1).bit_length()


@dataclass(frozen=True)
class KernelConfig:
    path: str = "fused"  # "fused" or "dequant" (dequantize + cuBLAS)
    block_n: int = 64
    block_m: int = 16
    split_k: int = 1
    swap_ab: bool = True
    num_warps: int = 4
    num_stages: int = 4
    # A register cap per thread (ptxas .maxnreg): more programs per SM for a latency-bound loop, at
    # the price of spills (int4 128x16 tiles: 95 registers, 5 programs of 4 warps per SM; capped at
    # 80, 6 programs and 27 spill loads/stores a tile). None: the compiler's choice.
    maxnreg: int | None = None
    # One matrix product per scale group instead of per plane (see the kernel's MERGE): fewer
    # waits on the matrix unit, more live registers; ignored where :func:`merges_planes` is False.
    merge_planes: bool = False

    def __post_init__(self):
        if self.path not in ("fused", "dequant"):
            raise ValueError(f"KernelConfig.path must be 'fused' or 'dequant', got {self.path!r}")
        for name in ("block_n", "block_m"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k must be >= 1, got {self.split_k}")
        if self.maxnreg is not None and not (32 <= self.maxnreg <= 255 and self.maxnreg % 8 == 0):
            raise ValueError(f"KernelConfig.maxnreg must be None or a multiple of 8 in 32..255, got {self.maxnreg}")


@lru_cache(maxsize=None)  # built on every call: the same few schemes and dtypes
def _scheme_constants(scheme: Scheme, compute: torch.dtype) -> dict:
    fmt = scheme.fmt
    code_bits = scheme.code_bits  # 2:4 sparse: the value and its 2-bit position
    segs = tuple(_pack.SEGMENTS[code_bits]) + (0, 0)
    if fmt.is_float:
        if not _decodes(fmt):
            raise ValueError(f"{fmt.name}: the kernels decode floats through fp16 exponents and need E <= 4")
        float_factor, man_bits, offset = float(2.0 ** (15 - fmt.bias)), fmt.man_bits, 0
    else:
        float_factor, man_bits, offset = 1.0, 0, fmt.offset
    return dict(BITS=fmt.bits, SEG0=segs[0], SEG1=segs[1], SEG2=segs[2], PD=_pack.plane_depth(code_bits),
                IS_FLOAT=fmt.is_float, MAN_BITS=man_bits,
                FLOAT_FACTOR=float_factor, SYMMETRIC=scheme.symmetric, OFFSET=offset,
                GROUP_SIZE=scheme.group_size, SCALE_MX=scheme.mx, COMPUTE=_TL_DTYPES[compute],
                ROW_BLOCK=_pack.ROW_BLOCK)


def kernels_decode(qw: QuantizedWeight) -> bool:
    """Whether the Triton kernels decode this format (floats through fp16 exponent fields: E <= 4)."""
    return _decodes(qw.scheme.fmt)


def _decodes(fmt) -> bool:
    return not fmt.is_float or fmt.exp_bits <= 4


def kernel_constants(qw: QuantizedWeight, compute: torch.dtype, device: torch.device) -> dict:
    """The fused kernel's constexpr arguments for ``qw`` with ``compute`` activations on ``device`` (a
    cached dict shared by every call: spread it, never modify it)."""
    return _kernel_constants(qw.scheme, qw.scales.dtype, compute, device.type == "cuda")


@lru_cache(maxsize=None)
def _kernel_constants(scheme: Scheme, scales_dtype: torch.dtype, compute: torch.dtype, on_gpu: bool) -> dict:
    return {**_scheme_constants(scheme, compute), **_fast_path_constants(scheme, scales_dtype, compute, on_gpu)}


def _fast_path_constants(scheme: Scheme, scales_dtype: torch.dtype, compute: torch.dtype, on_gpu: bool) -> dict:
    """Inline-PTX decoders on a real GPU (the interpreter has no inline asm; it decodes in plain
    Triton): int4 (MARLIN's trick), int8 and fp8 e4m3 in fp16 (byte permutes, the hardware's
    conversion, whose true values make the decode factor 1), every other format by the generic
    plane decoder, except 8-bit integers in bf16 (8 bits do not fit bf16's mantissa); symmetric
    2:4 codes of 4, 6 and 8-bit formats by the plane decoder's expanding variant."""
    fmt = scheme.fmt
    fp16 = compute == torch.float16
    out = dict(ASM4="", ASM8="", ASMP="", ASMP_REGS="",
               SCALE_IN_COMPUTE=not fmt.is_float and not scheme.mx and scales_dtype == compute)
    if not on_gpu:
        return out
    zero = None if fmt.is_float or not scheme.symmetric else fmt.offset
    if scheme.sparsity:  # 2:4: values and their expansion in one call (zero points: plain Triton)
        if scheme.symmetric and sparse_asm_supported(scheme.code_bits) and \
                (fp16 or fmt.is_float or fmt.bits < 8):
            out["ASMP"], out["ASMP_REGS"], _ = planes_asm(scheme.code_bits, fmt.is_float,
                                                          getattr(fmt, "man_bits", 0), fp16, zero, sparse=True)
        return out
    if not fmt.is_float and fmt.bits == 4:
        out["ASM4"] = int4_words_asm(fp16, zero)
    elif not fmt.is_float and fmt.bits == 8 and fp16:
        out["ASM8"] = int8_fp16_asm(zero)
    elif fmt.is_float and (fmt.exp_bits, fmt.man_bits) == (4, 3) and fp16:
        out.update(ASM8=e4m3_fp16_asm(), FLOAT_FACTOR=1.0)
    elif fmt.is_float or fmt.bits < 8:
        out["ASMP"], out["ASMP_REGS"], _ = planes_asm(fmt.bits, fmt.is_float, getattr(fmt, "man_bits", 0), fp16, zero)
    return out


def merges_planes(qw: QuantizedWeight) -> bool:
    """Whether ``KernelConfig.merge_planes`` changes the kernel for this weight: dense codes of
    fewer than 8 bits (several planes a tile) whose scale groups (or rows) span two planes or more."""
    depth = _pack.plane_depth(qw.scheme.code_bits)
    return (qw.scheme.sparsity is None and depth < _pack.TILE_K
            and (qw.scheme.per_channel or qw.scheme.group_size >= 2 * depth))


def _segment_args(qw: QuantizedWeight):
    segs = list(qw.packed) + [qw.packed[0]] * (3 - len(qw.packed))
    return segs, [s.stride(0) for s in segs]


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters of the split-K reduction: zero between launches (the kernel resets them)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def fused_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, cfg: KernelConfig,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel with an explicit config: ``x [M, K]`` (fp16/bf16, contiguous rows) -> ``[M, N]``
    (written into ``out`` when given: tests pass a poisoned buffer to see every element written)."""
    m, k = x.shape
    n = qw.out_features
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    dense_tile = dense_tile_k(qw)
    k_tiles = _cdiv(k, dense_tile)
    split = min(cfg.split_k, k_tiles)
    per_split = _cdiv(k_tiles, split)
    split = _cdiv(k_tiles, per_split)  # no empty split
    grid_mn = _cdiv(n, cfg.block_n) * _cdiv(m, cfg.block_m)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    counters = _counters(x.device, grid_mn) if split > 1 else out
    sums = x_sums(x, qw, per_split * dense_tile)
    segs, strides = _segment_args(qw)
    lowbit_matmul_kernel[(grid_mn, split)](
        x, *segs, qw.scales, qw.zeros if qw.zeros is not None else qw.scales, bias if bias is not None else out,
        out, partial, counters, out if sums is None else sums, m, n, k, x.stride(0), out.stride(0), *strides,
        0 if sums is None else sums.stride(0), per_split, qw.num_groups, split, HAS_X_SUMS=sums is not None,
        HAS_BIAS=bias is not None, EVEN_K=k % dense_tile == 0, SPARSE=qw.scheme.sparsity is not None,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, SWAP_AB=cfg.swap_ab, MERGE_PLANES=cfg.merge_planes,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
        **kernel_constants(qw, x.dtype, x.device))
    return out


def x_sums(x: torch.Tensor, qw: QuantizedWeight, k_per_split: int) -> torch.Tensor | None:
    """float32 sums of ``x [M, K]`` over the blocks of k whose zero-point correction the fused kernel
    applies at once: each group of at least a plane (at most a tile), or for per-channel scales the
    ``k_per_split`` columns of each split-K program. ``[blocks, M]`` (the kernel loads rows along the
    tokens); None where the kernel subtracts zero points from the codes instead (symmetric, 2:4,
    groups shallower than a plane)."""
    scheme = qw.scheme
    if scheme.symmetric or scheme.sparsity or (not scheme.per_channel and
                                               scheme.group_size < _pack.plane_depth(scheme.code_bits)):
        return None
    block = k_per_split if scheme.per_channel else min(scheme.group_size, _pack.TILE_K)
    m, k = x.shape
    padded = -(-k // block) * block if scheme.per_channel else _pack.padded_k(k)
    if padded != k:
        x = torch.nn.functional.pad(x, (0, padded - k))
    return x.view(m, padded // block, block).sum(-1, dtype=torch.float32).T.contiguous()


def dense_tile_k(qw: QuantizedWeight) -> int:
    """Dense input columns of one stored k-tile: 128, or 256 for 2:4 sparse weights."""
    return 2 * _pack.TILE_K if qw.scheme.sparsity else _pack.TILE_K


def dequantize(qw: QuantizedWeight, dtype: torch.dtype, block_n: int = 64) -> torch.Tensor:
    """``qw.dequantize(dtype)`` by a Triton kernel (in stored column order, i.e. before ``perm``)."""
    n, k = qw.shape
    out = torch.empty(n, k, dtype=dtype, device=qw.device)
    segs, strides = _segment_args(qw)
    lowbit_dequant_kernel[(_cdiv(n, block_n), _cdiv(k, dense_tile_k(qw)))](
        *segs, qw.scales, qw.zeros if qw.zeros is not None else qw.scales, out, n, k, *strides, qw.num_groups,
        SPARSE=qw.scheme.sparsity is not None, BLOCK_N=block_n, num_warps=4, **_scheme_constants(qw.scheme, dtype))
    return out


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@lru_cache(maxsize=None)  # read on every matmul call: the device's name does not change
def _device_slug(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index).lower().replace(" ", "-")


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _num_sms(device: torch.device) -> int:
    return _sm_count(_cuda_index(device)) if device.type == "cuda" else 8


def _gpu_slug(device: torch.device) -> str:
    return _device_slug(_cuda_index(device)) if device.type == "cuda" else "cpu"


# The fused kernel's best prefill tiles probed on the 70B gate_up layer (H200, session 6): at 256 tokens
# int4-g128 463 us against 490 for 256x64 tiles and 720 for dequantize + cuBLAS (cuBLAS alone: 351),
# int8 610 against 712; at 1024 tokens dequantize + cuBLAS is faster (int4 1868 against 1969 us).
PREFILL_FUSED = KernelConfig(block_n=128, block_m=128, split_k=1, swap_ab=True, num_warps=8, num_stages=3,
                             merge_planes=True)
PREFILL_FUSED_UP_TO = 256


def heuristic_config(m: int, n: int, k: int, bits: int, sms: int, narrow: bool = False,
                     prefill_fused: bool = False) -> KernelConfig:
    """A config from what tuning found on Hopper (used where no tuned entry exists).

    Up to 128 tokens, weights as the wide operand (swap A/B): up to 32 tokens 128-row tiles and 4
    warps, split-K until about 12 programs per SM (the loop is latency-bound: more programs in
    flight hide more of it); larger batches 64-row by 64-token tiles, about 2 programs per SM. Up to
    256 tokens :data:`PREFILL_FUSED` (where ``prefill_fused``, see :func:`prefill_tiles_fit`; not for
    2:4 weights), past that dequantize once and call cuBLAS. ``narrow`` (:func:`narrow_zero_groups`:
    four groups' scales, zeros and sums of x per tile) fits registers only with 16-token tiles (32
    spilled: 0.29x at M=32, against 0.97x at 16), so past 32 tokens it dequantizes.
    """
    if m > (32 if narrow else PREFILL_FUSED_UP_TO if prefill_fused else 128):
        return KernelConfig(path="dequant")
    if m > 128:
        return PREFILL_FUSED
    k_tiles = _cdiv(k, _pack.TILE_K)
    small = m <= 32
    block_n = 128 if small else 64
    block_m = 64 if not small else 16 if narrow else max(16, _next_power_of_2(m))
    tiles = _cdiv(n, block_n) * _cdiv(m, block_m)
    target = (12 if small else 2) * sms
    split = 1
    while tiles * split < target and split < min(8, max(1, k_tiles // 4)):
        split += 1
    return KernelConfig(block_n=block_n, block_m=block_m, split_k=split, swap_ab=True, num_warps=4, num_stages=3)


def narrow_zero_groups(symmetric: bool, group_size: int) -> bool:
    """Zero points with groups of 32 or fewer: the fused kernel holds four or more groups' scales,
    zeros and sums of x per tile (see :func:`heuristic_config`)."""
    return not symmetric and 0 < group_size <= 32


def prefill_tiles_fit(symmetric: bool, group_size: int) -> bool:
    """Whether :data:`PREFILL_FUSED`'s tiles fit registers: symmetric codes with per-channel scales or
    groups of 128 or more (offline SASS: zero points or groups of 32 spill, groups of 64 reach 252-254
    registers; measured at 256 tokens, fp4_e2m1-g32 0.43x against 0.50x dequantized)."""
    return symmetric and (group_size == -1 or group_size >= 128)


@lru_cache(maxsize=None)
def tuned_table(slug: str) -> tuple:
    path = CONFIG_DIR / f"{slug}.json"
    if not path.exists():
        return ()
    data = json.loads(path.read_text())
    # tables written before entries carried a dtype were all tuned with float16 activations
    return tuple(({"dtype": "float16", **e["key"]}, KernelConfig(**e["config"])) for e in data["entries"])


def table_key(m: int, qw: QuantizedWeight, dtype: torch.dtype) -> dict:
    """What a tuned entry is for: the code width, scale and zero kind and the activation dtype (they
    change the kernel's decode and registers: a register cap tuned with float16 can spill with
    bfloat16, bench/NOTES.md session 8) and the shape."""
    return {"bits": qw.scheme.bits, "float": qw.scheme.fmt.is_float, "group_size": qw.scheme.group_size,
            "symmetric": qw.scheme.symmetric, "n": qw.out_features, "k": qw.in_features, "m": m,
            "dtype": str(dtype).removeprefix("torch.")}


def choose_config(m: int, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> KernelConfig:
    """The tuned entry for this (bits, scale kind, N, K), batch bucket and activation ``dtype``, else
    the heuristic. The bucket comes first: a bfloat16 call takes a float16 entry of a smaller bucket
    over a bfloat16 entry of a larger one."""
    key = table_key(m, qw, dtype)
    return _choose(_gpu_slug(device), tuple(key.items()), qw.scheme.sparsity is not None, _num_sms(device))


@lru_cache(maxsize=65536)  # called on every matmul: a Python scan of the table took ~60 us
def _choose(slug: str, key: tuple, sparse: bool, sms: int) -> KernelConfig:
    want = dict(key)
    m, dtype, n, k, bits = want.pop("m"), want.pop("dtype"), want["n"], want["k"], want["bits"]
    narrow = narrow_zero_groups(want["symmetric"], want["group_size"])
    if sparse:  # no tuned entries for 2:4 weights yet (their k-tiles are 256 deep)
        return heuristic_config(m, n, k // 2, bits, sms, narrow)
    entries = [(e, cfg) for e, cfg in tuned_table(slug) if all(e.get(name) == value for name, value in want.items())
               and e["dtype"] in (dtype, "float16")]
    above = [e for e in entries if e[0]["m"] >= m]
    if above:  # the tuned entry of the smallest batch bucket >= m, of this dtype where there is one
        cfg = min(above, key=lambda e: (e[0]["m"], e[0]["dtype"] != dtype))[1]
        fit = max(16, _next_power_of_2(m))  # a bucket's token tile, narrowed to the batch (less padding)
        if cfg.path == "fused" and cfg.swap_ab and cfg.block_m > fit:
            cfg = KernelConfig(**{**asdict(cfg), "block_m": fit})
        return cfg
    return heuristic_config(m, n, k, bits, sms, narrow,
                            prefill_fused=prefill_tiles_fit(want["symmetric"], want["group_size"]))


def matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, force_triton: bool = False,
           config: KernelConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` on the GPU (or the interpreter with ``force_triton``)."""
    if not kernels_decode(qw):  # E = 5 floats: exact only through the reference dequantization
        if force_triton:
            raise ValueError(f"{qw.scheme}: the Triton kernels decode floats with at most 4 exponent bits")
        return torch.nn.functional.linear(x, qw.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
    if x.dtype == torch.float32:
        if force_triton:
            raise ValueError("the Triton kernels take float16 or bfloat16 activations, got float32")
        w = dequantize(qw, torch.float32) if x.is_cuda else qw.dequantize(torch.float32)
        return torch.nn.functional.linear(x if qw.perm is None else x[:, qw.perm], w, bias)
    if qw.perm is not None:
        x = x.index_select(1, qw.perm)
    x = x.contiguous()
    if qw.scheme.sparsity and config is None and not force_triton:  # the sparse tensor cores, where they apply
        y = sparse_cuda.try_matmul(x, qw, bias)
        if y is not None:
            return y
    cfg = config or choose_config(x.shape[0], qw, x.device, x.dtype)
    if cfg.path == "dequant" and force_triton:  # the fused kernel at its prefill tiles (slow where they spill)
        cfg = PREFILL_FUSED
    if cfg.path == "dequant":
        w = dequantize(qw, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    return fused_matmul(x, qw, bias, cfg)

