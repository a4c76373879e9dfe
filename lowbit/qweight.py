"""QuantizedWeight: packed codes, scales, zero points and the scheme that made them."""

from __future__ import annotations

from functools import lru_cache

import torch

from . import pack as _pack
from . import sparsity as _sparsity
from .scheme import Scheme

__all__ = ["QuantizedWeight", "packed_layout", "fuse_columns", "check_fusable", "check_row_blocks"]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@lru_cache(maxsize=4096)  # validated on every eager matmul call (its QuantizedWeight is rebuilt from the op's args)
def packed_layout(scheme: Scheme, n: int, k: int) -> tuple[tuple[tuple[int, int], torch.dtype], ...]:
    """(shape, dtype) of each packed segment tensor of an ``[n, k]`` weight under ``scheme``."""
    bits, stored = scheme.code_bits, scheme.stored_columns(k)
    return tuple((_pack.segment_shape(n, stored, bits, s), _pack.segment_dtype(bits, s)) for s in _pack.SEGMENTS[bits])


class QuantizedWeight:
    """A weight ``[out_features, in_features]`` quantized under a :class:`Scheme`.

    Tensors (all in the kernels' layout, see :mod:`lowbit.pack`):

    * ``packed``: one tensor per bit segment of the codes. 2:4 sparse schemes store, per row, two
      ``(value_code << 2) | position`` codes per group of four inputs (see :mod:`lowbit.sparsity`).
    * ``scales``: ``[groups, out_features]`` (group-major, so a tile of rows reads contiguous
      scales). float16/bfloat16 following the weight for group scales, float32 for per-channel
      scales, uint8 E8M0 exponents for ``mx`` schemes.
    * ``zeros``: ``[groups, out_features]`` uint8 zero-point codes (asymmetric schemes only).
    * ``perm``: optional ``[in_features]`` int64 column order (GPTQ act-order): the codes hold
      ``W[:, perm]`` and the matmul reads ``x[..., perm]``.
    """

    def __init__(self, scheme: Scheme, shape: tuple[int, int], packed: tuple[torch.Tensor, ...],
                 scales: torch.Tensor, zeros: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float16):
        self.scheme = Scheme.parse(scheme)
        self.shape = (int(shape[0]), int(shape[1]))
        self.packed = tuple(packed)
        self.scales = scales
        self.zeros = zeros
        self.perm = perm
        self.dtype = dtype
        self.validate()

    # -- structure ---------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def num_groups(self) -> int:
        g = self.scheme.group_size
        return 1 if g == -1 else -(-self.in_features // g)

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def expected_scale_dtype(self) -> torch.dtype:
        if self.scheme.mx:
            return torch.uint8
        if self.scheme.per_channel or self.dtype == torch.float32:
            return torch.float32
        return self.dtype

    def validate(self) -> None:
        """Raise ValueError naming the first tensor whose shape or dtype does not fit the scheme."""
        n, k = self.shape
        if n <= 0 or k <= 0:
            raise ValueError(f"QuantizedWeight shape must be positive, got {self.shape}")
        if self.dtype not in _ACT_DTYPES:
            raise ValueError(f"QuantizedWeight dtype must be float16, bfloat16 or float32, got {self.dtype}")
        layout = packed_layout(self.scheme, n, k)
        if len(self.packed) != len(layout):
            raise ValueError(f"packed: {self.scheme} needs {len(layout)} segment tensor(s), got {len(self.packed)}")
        segs = _pack.SEGMENTS[self.scheme.code_bits]
        for i, (s, t, (shape, dtype)) in enumerate(zip(segs, self.packed, layout)):
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"packed[{i}] ({s}-bit segment): expected {dtype} {shape}, "
                                 f"got {t.dtype} {tuple(t.shape)}")
        want = (self.num_groups, n)
        if tuple(self.scales.shape) != want or self.scales.dtype != self.expected_scale_dtype():
            raise ValueError(f"scales: expected {self.expected_scale_dtype()} {want}, "
                             f"got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.scheme.symmetric != (self.zeros is None):
            raise ValueError(f"zeros: {'not expected' if self.scheme.symmetric else 'required'} for {self.scheme}")
        if self.zeros is not None and (tuple(self.zeros.shape) != want or self.zeros.dtype != torch.uint8):
            raise ValueError(f"zeros: expected uint8 {want}, got {self.zeros.dtype} {tuple(self.zeros.shape)}")
        if self.perm is not None and self.scheme.sparsity:
            raise ValueError(f"perm: {self.scheme} is 2:4 sparse, whose groups of four are consecutive inputs; "
                             "act-order (a column permutation) cannot be combined with it")
        if self.perm is not None and (tuple(self.perm.shape) != (k,) or self.perm.dtype != torch.int64):
            raise ValueError(f"perm: expected int64 ({k},), got {self.perm.dtype} {tuple(self.perm.shape)}")
        device = self.scales.device
        if any(t is not None and t.device != device for t in (*self.packed, self.zeros, self.perm)):
            devices = sorted({str(t.device) for t in self.tensors().values()})
            raise ValueError(f"all tensors of a QuantizedWeight must be on one device, got {devices}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by a stable name (the checkpoint keys, relative to the layer)."""
        out = {f"packed_{i}": t for i, t in enumerate(self.packed)}
        out["scales"] = self.scales
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    def meta(self) -> dict:
        return {"scheme": str(self.scheme), "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "layout": _pack.LAYOUT}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "QuantizedWeight":
        """Inverse of :meth:`tensors` + :meth:`meta`; raises ValueError on anything missing or malformed."""
        if meta.get("layout") != _pack.LAYOUT:
            raise ValueError(f"layout {meta.get('layout')!r} is not supported (expected {_pack.LAYOUT!r})")
        dtype = getattr(torch, str(meta.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {meta.get('dtype')!r} is not a torch dtype")
        shape = meta.get("shape")
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(d, int) for d in shape)):
            raise ValueError(f"shape must be two integers, got {shape!r}")
        scheme = Scheme.parse(meta.get("scheme"))
        nseg = len(_pack.SEGMENTS[scheme.code_bits])
        names = [f"packed_{i}" for i in range(nseg)] + ["scales"]
        names += [] if scheme.symmetric else ["zeros"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"missing tensor(s) {missing} for {scheme}")
        extra = set(tensors) - set(names) - {"perm"}
        if extra:
            raise ValueError(f"unexpected tensor(s) {sorted(extra)} for {scheme}")
        return cls(scheme, tuple(shape), tuple(tensors[f"packed_{i}"] for i in range(nseg)), tensors["scales"],
                   tensors.get("zeros"), tensors.get("perm"), dtype)

    # -- values ------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``[out, in]`` (uint8), in stored column order; for 2:4 sparse schemes the
        stored ``(value_code << 2) | position`` codes ``[out, scheme.stored_columns(in)]``
        (:func:`lowbit.pack.code_dtype` of ``scheme.code_bits``)."""
        return _pack.unpack_codes(self.packed, self.scheme.code_bits, self.scheme.stored_columns(self.in_features),
                                 rows=self.out_features, sparse=self.scheme.sparsity is not None)

    def scale_values(self) -> torch.Tensor:
        """Scales as float32 ``[groups, out]`` (E8M0 exponents decoded for mx)."""
        if self.scheme.mx:
            return torch.ldexp(torch.ones(self.scales.shape, device=self.device), self.scales.to(torch.int32) - 127)
        return self.scales.to(torch.float32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weights ``[out, in]`` in original column order: ``decode(codes - zero) * scale``
        computed in float32 (exact), then rounded to ``dtype`` (default: the weight's dtype).
        2:4 sparse schemes: the kept values at their positions, exact zeros elsewhere."""
        from .quantize.rtn import decode_codes  # the one definition of code -> value

        k = self.in_features
        if self.scheme.sparsity:
            return self._sparse_dense_values().to(dtype or self.dtype)
        g = k if self.scheme.per_channel else self.scheme.group_size

        def per_column(t: torch.Tensor) -> torch.Tensor:  # [groups, n] -> [n, k]
            return t.T.repeat_interleave(g, dim=1)[:, :k]

        zeros = None if self.zeros is None else per_column(self.zeros)
        w = decode_codes(self.codes(), self.scheme, per_column(self.scale_values()), zeros)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype or self.dtype)

    def _sparse_dense_values(self) -> torch.Tensor:
        """float32 ``[out, in]`` of a 2:4 sparse weight: each kept value decoded with the scale (and
        zero point) of its dense column's group, scattered to that column."""
        from .quantize.rtn import decode_codes

        value_codes, positions = _sparsity.split_codes(self.codes())
        columns = _sparsity.dense_columns(positions)
        groups = torch.zeros_like(columns) if self.scheme.per_channel else columns // self.scheme.group_size
        scales = self.scale_values().T.gather(1, groups)
        zeros = None if self.zeros is None else self.zeros.T.gather(1, groups)
        values = decode_codes(value_codes, self.scheme, scales, zeros)
        return _sparsity.scatter(values, columns, self.in_features)

    @property
    def bits_per_weight(self) -> float:
        """Payload bits per weight: codes, scales and zero points (not the kernel layout's padding of K;
        2:4 sparse schemes: ``bits + 2`` per kept value, two per group of four)."""
        n, k = self.shape
        bits = self.scheme.code_bits * n * self.scheme.stored_columns(k)
        bits += self.scales.element_size() * 8 * self.scales.numel()
        if self.zeros is not None:
            bits += 8 * self.zeros.numel()
        return bits / (n * k)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored, padding included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.scheme, self.shape, tuple(t.to(device) for t in self.packed),
                               self.scales.to(device), None if self.zeros is None else self.zeros.to(device),
                               None if self.perm is None else self.perm.to(device), self.dtype)

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.scheme}, shape={self.shape}, dtype={self.dtype}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, device={self.device})")


def check_row_blocks(name: str, start: int, size: int, rows: int) -> None:
    """Raise ValueError unless output rows ``[start, start+size)`` of a ``rows``-row weight are whole
    ``ROW_BLOCK``-row blocks of the packed layout (a range ending on ``rows`` may end in a partial block)."""
    if start % _pack.ROW_BLOCK or (size % _pack.ROW_BLOCK and start + size != rows):
        raise ValueError(f"{name}: output rows [{start}, {start + size}) of {rows} are not whole "
                         f"{_pack.ROW_BLOCK}-row blocks of the packed layout {_pack.LAYOUT}: the offset and size "
                         f"must be multiples of {_pack.ROW_BLOCK} (only a part ending on row {rows} may be shorter)")


def check_fusable(parts: list[QuantizedWeight]) -> None:
    """Raise ValueError unless :func:`fuse_columns` can fuse ``parts``."""
    first = parts[0]
    for p in parts[1:]:
        if (p.scheme, p.in_features, p.dtype, p.device) != (first.scheme, first.in_features, first.dtype, first.device):
            raise ValueError(f"cannot fuse {p} with {first}: scheme, in_features, dtype and device must match")
        if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
            raise ValueError("cannot fuse act-order weights with different permutations")
    rows = sum(p.out_features for p in parts)
    start = 0
    for i, p in enumerate(parts):
        check_row_blocks(f"fuse_columns part {i}", start, p.out_features, rows)
        start += p.out_features


def fuse_columns(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """One weight whose rows are those of ``parts`` in order (fused QKV, gate/up): the packed row
    blocks are concatenated, so every part but the last must be whole 16-row blocks."""
    check_fusable(parts)
    first = parts[0]
    rows = sum(p.out_features for p in parts)
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts], 1)  # [groups, rows]
    return QuantizedWeight(first.scheme, (rows, first.in_features),
                           tuple(torch.cat(seg) for seg in zip(*(p.packed for p in parts))),  # [row blocks, words]
                           torch.cat([p.scales for p in parts], 1), zeros, first.perm, first.dtype)
