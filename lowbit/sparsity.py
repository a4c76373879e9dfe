"""2:4 structured sparsity: which entries a sparse weight keeps, and its compressed columns.

A dense weight ``[N, K]`` is cut along K into groups of ``GROUP = 4`` columns (K padded with zero
columns to :func:`padded_columns`); every group keeps exactly ``KEEP = 2`` entries, at positions
``p_0 < p_1`` (0..3), and the others are zero. Compressed column ``c = 2*j + s`` holds the kept entry
of group ``j`` at position ``p_s``, stored as the code ``(value_code << 2) | p_s`` (:func:`merge_codes`):
:func:`stored_columns` columns of ``bits + 2``-bit codes, packed by ``lowbit.pack.pack_codes(...,
sparse=True)``, which recodes the positions as the cases the sparse kernels read. A group with
fewer than two non-zero entries still names two distinct positions (a kept entry may be zero).
"""

from __future__ import annotations

import torch

from . import pack as _pack

__all__ = ["GROUP", "KEEP", "POSITION_BITS", "padded_columns", "stored_columns", "keep_mask", "positions",
           "check_positions", "dense_columns", "merge_codes", "split_codes", "scatter"]

GROUP, KEEP, POSITION_BITS = 4, 2, 2


def padded_columns(k: int) -> int:
    """``k`` rounded up to whole groups of four."""
    return -(-k // GROUP) * GROUP


def stored_columns(k: int) -> int:
    """Compressed columns of a weight with ``k`` dense columns: two per group of four."""
    return padded_columns(k) // GROUP * KEEP


def _group_widths(k: int, device) -> torch.Tensor:
    """Real (not padding) columns of each group of four."""
    widths = torch.full((padded_columns(k) // GROUP,), GROUP, dtype=torch.int64, device=device)
    widths[-1] = k - (padded_columns(k) - GROUP)
    return widths


def _pad_groups(t: torch.Tensor, fill) -> torch.Tensor:
    """``t [N, K]`` padded with ``fill`` columns to whole groups, viewed as ``[N, groups, 4]``."""
    n, k = t.shape
    padded = torch.full((n, padded_columns(k)), fill, dtype=t.dtype, device=t.device)
    padded[:, :k] = t
    return padded.view(n, -1, GROUP)


def keep_mask(saliency: torch.Tensor) -> torch.Tensor:
    """Bool ``[N, K]``: in every group of four columns of ``saliency [N, K]`` (>= 0), the two largest
    (ties go to the lower column); every column of a last group narrower than three."""
    n, k = saliency.shape
    ranked = torch.argsort(_pad_groups(saliency.to(torch.float32), -1.0), dim=-1, descending=True, stable=True)
    kept = torch.zeros(n, padded_columns(k) // GROUP, GROUP, dtype=torch.bool, device=saliency.device)
    kept.scatter_(-1, ranked[..., :KEEP], True)  # padding (-1) loses to every real column
    return kept.view(n, -1)[:, :k]


def positions(keep: torch.Tensor) -> torch.Tensor:
    """Positions (0..3, int64) ``[N, stored_columns(K)]`` of the entries ``keep [N, K]`` marks, ascending
    within each group. ``keep`` must mark two entries in every group of four (all the columns of a last
    group of one or two); a last group of one column is completed with its first padding position."""
    n, k = keep.shape
    groups = _pad_groups(keep.to(torch.uint8), 0)
    wanted = _group_widths(k, keep.device).clamp(max=KEEP)
    if not torch.equal(groups.sum(-1), wanted.expand(n, -1)):
        raise ValueError(f"keep [{n}, {k}] must mark exactly {KEEP} entries in every group of {GROUP} columns "
                         f"(every column of a last group narrower than {KEEP + 1})")
    marked_first = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :KEEP]
    return marked_first.sort(dim=-1).values.reshape(n, -1)


def check_positions(positions: torch.Tensor) -> None:
    """Raise ValueError unless the two positions of every group are distinct and ascending (``p_0 < p_1``)."""
    pairs = positions.reshape(positions.shape[0], -1, KEEP)
    bad = pairs[..., 0] >= pairs[..., 1]
    if bad.any():
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"2:4 positions of row {row}, group {group} are {pairs[row, group].tolist()}: "
                         "expected two ascending positions (p0 < p1) in every group of four")


def dense_columns(positions: torch.Tensor) -> torch.Tensor:
    """The dense column (int64, in ``0 .. padded_columns(K) - 1``) of every stored entry: ``4 * group + position``."""
    group = torch.arange(positions.shape[-1], device=positions.device) // KEEP
    return group * GROUP + positions.to(torch.int64)


def merge_codes(value_codes: torch.Tensor, positions: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes ``(value_code << 2) | position`` of ``bits``-bit value codes, in
    :func:`lowbit.pack.code_dtype` of ``bits + 2``."""
    dtype = _pack.code_dtype(bits + POSITION_BITS)
    return (value_codes.to(dtype) << POSITION_BITS) | positions.to(dtype)


def split_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_codes`: (value codes uint8, positions int64)."""
    return (codes >> POSITION_BITS).to(torch.uint8), (codes & ((1 << POSITION_BITS) - 1)).to(torch.int64)


def scatter(values: torch.Tensor, columns: torch.Tensor, k: int) -> torch.Tensor:
    """Dense ``[N, k]``: ``values [N, stored]`` at their dense ``columns``, zero everywhere else."""
    dense = values.new_zeros(values.shape[0], padded_columns(k))
    return dense.scatter_(1, columns, values)[:, :k]
