"""Round-to-nearest quantization with optional per-group clipping search.

The pieces are public to the package because GPTQ rounds with the very same grid:
``group_params`` (scales and zero points of a block of columns), ``encode_codes`` and
``decode_codes`` (element-wise, scales already expanded to the weight's shape).
"""

from __future__ import annotations

import math

import torch

from .. import pack as _pack
from .. import sparsity as _sparsity
from ..formats import FloatFormat
from ..qweight import QuantizedWeight
from ..scheme import Scheme

CLIP_RATIOS = torch.linspace(1.0, 0.55, 19).tolist()


def scale_storage_dtype(scheme: Scheme, weight_dtype: torch.dtype) -> torch.dtype:
    if scheme.mx:
        return torch.uint8
    if scheme.per_channel or weight_dtype == torch.float32:
        return torch.float32
    return weight_dtype


def _store_scales(s: torch.Tensor, scheme: Scheme, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Round float32 scales to their storage dtype: (stored tensor, its exact float32 value)."""
    sd = scale_storage_dtype(scheme, weight_dtype)
    if sd == torch.uint8:  # E8M0: scale = 2^(e - 127)
        e = torch.floor(torch.log2(s)).clamp_(-127, 127).to(torch.int32) + 127
        return e.to(torch.uint8), torch.ldexp(torch.ones_like(s), e - 127)
    fi = torch.finfo(sd)
    # Integer grids are not scale-invariant: a scale below the smallest normal (fp16: 6.1e-5) is
    # stored as a subnormal rather than rounded up to it (float grids barely lose from the latter).
    lowest = fi.tiny if scheme.fmt.is_float else fi.tiny * fi.eps
    stored = s.clamp(lowest, fi.max).to(sd)
    return stored, stored.to(torch.float32)


def _raw_scales(w: torch.Tensor, scheme: Scheme, ratio: torch.Tensor | float):
    """float32 scales (and zero points) for grouped weights ``w [N, G, g]``, ranges shrunk by ``ratio``."""
    fmt = scheme.fmt
    if isinstance(fmt, FloatFormat):
        amax = w.abs().amax(dim=-1) * ratio
        if scheme.mx:
            emax = math.floor(math.log2(fmt.max_value))
            s = torch.ldexp(torch.ones_like(amax), torch.floor(torch.log2(amax.clamp(min=1e-30))).to(torch.int32) - emax)
        else:
            s = amax / fmt.max_value
        return torch.where(amax > 0, s, torch.ones_like(s)), None
    maxq = (1 << fmt.bits) - 1
    if scheme.symmetric:
        amax = w.abs().amax(dim=-1) * ratio
        s = 2 * amax / maxq
        return torch.where(amax > 0, s, torch.ones_like(s)), None
    lo = w.amin(dim=-1).clamp(max=0) * ratio
    hi = w.amax(dim=-1).clamp(min=0) * ratio
    s = (hi - lo) / maxq
    s = torch.where(hi > lo, s, torch.ones_like(s))
    return s, torch.round(-lo / s).clamp_(0, maxq)


def encode_codes(w: torch.Tensor, scheme: Scheme, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Codes (uint8) of float32 ``w`` under element-wise ``scales`` (and integer ``zeros``)."""
    fmt = scheme.fmt
    if isinstance(fmt, FloatFormat):
        return fmt.encode(w / scales)
    z = fmt.offset if zeros is None else zeros.to(torch.float32)
    return (torch.round(w / scales) + z).clamp_(0, fmt.max_code).to(torch.uint8)


def decode_codes(codes: torch.Tensor, scheme: Scheme, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """float32 values of ``codes`` under element-wise ``scales`` (and ``zeros``)."""
    fmt = scheme.fmt
    if isinstance(fmt, FloatFormat):  # (codes are in range: unpacked, or just encoded)
        return fmt.lookup(codes) * scales
    z = fmt.offset if zeros is None else zeros.to(torch.float32)
    return (codes.to(torch.float32) - z) * scales


def group_params(w: torch.Tensor, scheme: Scheme, weight_dtype: torch.dtype, clip_search: bool = False):
    """Scales and zero points for ``w [N, C]`` (float32), one per group of ``group_size`` columns
    (the whole row for per-channel). Returns ``(stored_scales [N, G], scales_f32 [N, G], zeros [N, G] | None)``.
    With ``clip_search``, each group's range is shrunk by the ratio in ``CLIP_RATIOS`` that minimizes
    the group's squared reconstruction error."""
    n, c = w.shape
    g = c if scheme.per_channel else scheme.group_size
    groups = -(-c // g)
    wg = torch.zeros(n, groups * g, dtype=torch.float32, device=w.device)
    wg[:, :c] = w
    wg = wg.view(n, groups, g)
    ratios = CLIP_RATIOS if clip_search and not scheme.mx else [1.0]
    best_err = best = None
    for r in ratios:
        s, z = _raw_scales(wg, scheme, r)
        stored, s32 = _store_scales(s, scheme, weight_dtype)
        if len(ratios) == 1:
            return stored, s32, z
        se, ze = s32.unsqueeze(-1), None if z is None else z.unsqueeze(-1)
        err = (decode_codes(encode_codes(wg, scheme, se, ze), scheme, se, ze) - wg).pow_(2).sum(-1)
        if best is None:
            best_err, best = err, (stored, s32, z)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, stored, best[0]), torch.where(better, s32, best[1]),
                None if z is None else torch.where(better, z, best[2]))
    return best


def expand_groups(t: torch.Tensor, scheme: Scheme, k: int) -> torch.Tensor:
    """``[N, G]`` per-group values -> ``[N, k]`` per-column values."""
    g = k if scheme.per_channel else scheme.group_size
    return t.repeat_interleave(g, dim=1)[:, :k]


def quantize_rtn(w: torch.Tensor, scheme: Scheme, clip_search: bool = False) -> QuantizedWeight:
    """RTN; 2:4 sparse schemes first prune by magnitude (the two largest of every four inputs), then
    round the pruned weight, its scales fitted to what is kept."""
    n, k = w.shape
    w32 = w.to(torch.float32)
    keep = None
    if scheme.sparsity:
        keep = _sparsity.keep_mask(w32.abs())
        w32 = torch.where(keep, w32, 0.0)
    stored, s32, zeros = group_params(w32, scheme, w.dtype, clip_search)
    codes = encode_codes(w32, scheme, expand_groups(s32, scheme, k),
                         None if zeros is None else expand_groups(zeros, scheme, k))
    return build(scheme, codes, stored, zeros, w.dtype, keep=keep)


def build(scheme: Scheme, codes: torch.Tensor, stored_scales: torch.Tensor, zeros: torch.Tensor | None,
          dtype: torch.dtype, perm: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> QuantizedWeight:
    """Pack ``codes [N, K]`` and per-row scales/zeros ``[N, G]`` into a QuantizedWeight.

    2:4 sparse schemes need ``keep [N, K]`` (bool, see :func:`lowbit.sparsity.keep_mask`): only the
    codes it marks are stored, with their positions; the others are pruned (zero)."""
    if (keep is None) != (scheme.sparsity is None):
        raise ValueError(f"build: keep (the 2:4 mask) is {'required' if keep is None else 'not expected'} "
                         f"for {scheme}")
    n, k = codes.shape
    if keep is not None:
        if keep.shape != codes.shape or keep.dtype != torch.bool:
            raise ValueError(f"build: keep must be bool {tuple(codes.shape)} like the codes, "
                             f"got {keep.dtype} {tuple(keep.shape)}")
        codes = _sparse_codes(scheme, codes, keep, zeros)
    return QuantizedWeight(scheme, (n, k), _pack.pack_codes(codes, scheme.code_bits, sparse=scheme.sparsity is not None),
                           stored_scales.T.contiguous(),
                           None if zeros is None else zeros.T.contiguous().to(torch.uint8), perm, dtype)


def _sparse_codes(scheme: Scheme, codes: torch.Tensor, keep: torch.Tensor, zeros: torch.Tensor | None):
    """The stored codes ``[N, stored_columns(K)]`` of the entries ``keep`` marks: value code and position."""
    positions = _sparsity.positions(keep)
    n, k = codes.shape
    pad = torch.zeros(n, _sparsity.padded_columns(k) - k, device=codes.device)
    # A last group of one column keeps a padding entry too: it stores the code of zero (under the
    # last group's zero point), so that it dequantizes to exactly 0.
    zero_codes = encode_codes(pad, scheme, torch.ones_like(pad), None if zeros is None else zeros[:, -1:])
    kept = torch.cat([codes, zero_codes], dim=1).gather(1, _sparsity.dense_columns(positions))
    return _sparsity.merge_codes(kept, positions, scheme.bits)
