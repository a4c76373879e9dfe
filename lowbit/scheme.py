"""Scheme: how a weight is quantized, packed, stored and multiplied.

Grammar of ``Scheme.parse`` (and of ``str(scheme)``)::

    FORMAT-GRANULARITY[-asym][-mx][-2:4]

    FORMAT       int2..int8 | fpN_eEmM | fp6 | fp5 | fp4 | fp8
    GRANULARITY  gG (G a power of two >= 16: one scale per G input weights of a row)
                 | channel (one scale per output row)
    asym         integer formats only: a zero point per group
    mx           power-of-two (E8M0) scales, as the OCP MX formats (float formats, g32)
    2:4          two non-zeros in every four consecutive input weights (see lowbit.sparsity):
                 stores (bits + 2)-bit codes, so every format but the 7-bit ones
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from . import formats as _formats
from . import pack as _pack
from . import sparsity as _sparsity

__all__ = ["Scheme"]


@dataclass(frozen=True)
class Scheme:
    format: str
    group_size: int = 128
    symmetric: bool = True
    sparsity: str | None = None
    mx: bool = False

    def __post_init__(self):
        fmt = _formats.get(self.format)  # raises ValueError for unknown formats
        object.__setattr__(self, "format", fmt.name)
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool):
            raise ValueError(f"group_size must be an int (-1 or a power of two >= 16), got {g!r}")
        if g != -1 and (g < 16 or g & (g - 1)):
            raise ValueError(f"group_size must be -1 (per output channel) or a power of two >= 16, got {g}")
        if not self.symmetric and fmt.is_float:
            raise ValueError(f"asymmetric (zero-point) quantization is for integer formats only, not {fmt.name}")
        if self.sparsity not in (None, "2:4"):
            raise ValueError(f"sparsity must be None or '2:4', got {self.sparsity!r}")
        if self.sparsity and fmt.bits + _sparsity.POSITION_BITS not in _pack.SEGMENTS:
            raise ValueError(f"{fmt.name} has no 2:4 variant: 2:4 stores each kept value with its 2-bit position "
                             f"({fmt.bits + _sparsity.POSITION_BITS}-bit codes), and the layout packs "
                             f"{sorted(_pack.SEGMENTS)}-bit codes; choose a format of 2 to 6 or of 8 bits")
        if self.mx and not fmt.is_float:
            raise ValueError("mx (power-of-two) scales are for floating formats only")
        if self.mx and g == -1:
            raise ValueError("mx scales need a group size (the MX convention is g32)")

    @cached_property  # read on every matmul call (in the instance's __dict__: not a field, no effect on ==)
    def fmt(self) -> _formats.Format:
        return _formats.get(self.format)

    def __reduce__(self):  # pickles and copies carry the fields only, not the cached format (and its tables)
        return type(self), (self.format, self.group_size, self.symmetric, self.sparsity, self.mx)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    @property
    def code_bits(self) -> int:
        """Bits of a stored code: the format's, plus the 2-bit position for 2:4 sparse schemes."""
        return self.bits + (_sparsity.POSITION_BITS if self.sparsity else 0)

    def stored_columns(self, in_features: int) -> int:
        """Columns of stored codes for ``in_features`` dense columns (2:4: two per group of four)."""
        return _sparsity.stored_columns(in_features) if self.sparsity else in_features

    @classmethod
    def parse(cls, text: "str | Scheme") -> "Scheme":
        if isinstance(text, Scheme):
            return text
        if not isinstance(text, str) or not text:
            raise ValueError(f"a scheme is a string like 'int4-g128', got {text!r}")
        return _parse(cls, text)

    @classmethod
    def _from_text(cls, text: str) -> "Scheme":
        parts = text.strip().lower().split("-")
        if len(parts) < 2:
            raise ValueError(f"scheme {text!r}: expected FORMAT-gG or FORMAT-channel, e.g. 'int4-g128', "
                             "'int4-g32-asym', 'fp6_e3m2-channel', 'int4-g128-2:4'")
        fmt, gran, *flags = parts
        if gran == "channel":
            group = -1
        elif gran.startswith("g") and gran[1:].isascii() and gran[1:].isdigit():
            group = int(gran[1:])
        else:
            raise ValueError(f"scheme {text!r}: granularity must be gG (e.g. g128) or 'channel', got {gran!r}")
        known = {"asym", "mx", "2:4"}
        unknown = [f for f in flags if f not in known]
        if unknown or len(set(flags)) != len(flags):
            raise ValueError(f"scheme {text!r}: unknown or repeated flag(s) in {flags}; allowed: asym, mx, 2:4")
        return cls(fmt, group, symmetric="asym" not in flags, sparsity="2:4" if "2:4" in flags else None,
                   mx="mx" in flags)

    def __str__(self) -> str:
        s = f"{self.format}-{'channel' if self.per_channel else f'g{self.group_size}'}"
        if not self.symmetric:
            s += "-asym"
        if self.mx:
            s += "-mx"
        if self.sparsity:
            s += f"-{self.sparsity}"
        return s


@lru_cache(maxsize=256)  # parsed on every matmul call (the op passes the scheme as text); a Scheme is immutable
def _parse(cls, text: str) -> Scheme:
    return cls._from_text(text)
