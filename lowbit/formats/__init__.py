"""Number formats of low-bit weights: exact encode/decode, the ground truth of lowbit.

Two families:

* ``intB`` (B = 2..8): codes are unsigned ``0 .. 2^B-1``. A symmetric scheme reads code ``c`` as
  ``c - 2^(B-1)`` (offset binary, as GPTQ's ``uint4b8``); an asymmetric scheme reads it as
  ``c - z`` with a zero point ``z`` per group. ``decode`` gives the symmetric reading.
* ``fpN_eEmM`` (1+E+M = N <= 8, E >= 1): sign in the top bit, then exponent, then mantissa,
  bias ``2^(E-1)-1``, subnormals, and no inf/NaN: every code is finite. ``fp8_e4m3`` is the
  exception and follows OCP e4m3fn: max 448, codes 0x7F and 0xFF are NaN and never produced.

``encode`` rounds to nearest, ties to the even code, and saturates at the largest finite value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

__all__ = ["Format", "IntFormat", "FloatFormat", "get", "names", "ALIASES"]

ALIASES = {"fp6": "fp6_e3m2", "fp5": "fp5_e2m2", "fp4": "fp4_e2m1", "fp8": "fp8_e4m3"}


class Format:
    """A number format: ``bits``, ``encode``, ``decode``, ``values``."""

    name: str
    bits: int

    @property
    def is_float(self) -> bool:
        return isinstance(self, FloatFormat)

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    def values(self) -> torch.Tensor:
        """All values in code order (float32; NaN where a code is NaN)."""
        return self.decode(torch.arange(self.num_codes, dtype=torch.uint8))

    def __repr__(self) -> str:
        return f"lowbit.formats.get({self.name!r})"


@dataclass(frozen=True, repr=False)
class IntFormat(Format):
    bits: int

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def offset(self) -> int:
        """Zero point of the symmetric reading."""
        return 1 << (self.bits - 1)

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def max_value(self) -> float:
        return float(self.max_code - self.offset)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_encode_input(x)
        return (torch.round(x) + self.offset).clamp_(0, self.max_code).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        _check_codes(codes, self.bits)
        return codes.to(torch.float32) - self.offset


@dataclass(frozen=True, repr=False)
class FloatFormat(Format):
    exp_bits: int
    man_bits: int

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 1 + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:
        return f"fp{self.bits}_e{self.exp_bits}m{self.man_bits}"

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def ocp_e4m3fn(self) -> bool:
        return self.exp_bits == 4 and self.man_bits == 3

    @cached_property
    def _magnitudes(self) -> torch.Tensor:
        """Non-negative finite values, indexed by code without the sign bit (float64, increasing)."""
        n = 1 << (self.exp_bits + self.man_bits)
        c = torch.arange(n, dtype=torch.int64)
        e = c >> self.man_bits
        m = (c & ((1 << self.man_bits) - 1)).to(torch.float64) / (1 << self.man_bits)
        normal = torch.ldexp(1.0 + m, (e - self.bias).to(torch.float64))
        sub = torch.ldexp(m, torch.full_like(m, 1.0 - self.bias))
        mags = torch.where(e == 0, sub, normal)
        if self.ocp_e4m3fn:
            mags = mags[:-1]  # code 0x7F is NaN
        return mags

    @property
    def max_value(self) -> float:
        return float(self._magnitudes[-1])

    @property
    def min_subnormal(self) -> float:
        return float(self._magnitudes[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_encode_input(x).to(torch.float64).contiguous()
        mags = self._magnitudes.to(x.device)
        a = x.abs().clamp_(max=mags[-1])
        mids = (mags[1:] + mags[:-1]) / 2  # exact in float64
        lo = torch.bucketize(a, mids, right=False)  # index of the first midpoint >= a
        # a == mids[lo] is a tie: take the even code of the two neighbours.
        tie = (lo < mids.numel()) & (a == mids[lo.clamp(max=mids.numel() - 1)])
        code = torch.where(tie & (lo % 2 == 1), lo + 1, lo)
        sign = torch.signbit(x).to(torch.int64) << (self.bits - 1)
        return (code | sign).to(torch.uint8)

    @cached_property
    def _code_values(self) -> torch.Tensor:
        """float32 value of every code (NaN for e4m3's NaN codes): decoding is one table lookup."""
        mags = self._magnitudes
        if self.ocp_e4m3fn:
            mags = torch.cat([mags, mags.new_full((1,), float("nan"))])
        return torch.cat([mags, -mags]).to(torch.float32)

    @cached_property
    def _tables(self) -> dict:
        """:attr:`_code_values` per device (copied once: a copy inside CUDA graph capture would fail)."""
        return {}

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        _check_codes(codes, self.bits)
        return self.lookup(codes)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` without its range check (a host sync): for codes known to be in range,
        e.g. unpacked ones, also inside CUDA graph capture once this device has decoded once."""
        table = self._tables.get(codes.device)
        if table is None:
            table = self._tables[codes.device] = self._code_values.to(codes.device)
        return table.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)


def _check_encode_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"encode expects a floating-point tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    x = x.to(torch.float32)
    if torch.isnan(x).any():
        raise ValueError("encode got NaN values: low-bit formats have no NaN to encode them to")
    return x


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError("decode expects an integer tensor of codes (uint8)")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for a {bits}-bit format: expected 0..{(1 << bits) - 1}")


_FLOAT_RE = re.compile(r"^fp(\d)_e(\d)m(\d)$")
_INT_RE = re.compile(r"^int(\d)$")


def get(name: str) -> Format:
    """The format called ``name``: ``int2``..``int8``, ``fpN_eEmM`` with 1+E+M = N <= 8, or an alias."""
    if not isinstance(name, str):
        raise TypeError(f"format name must be a string, got {type(name).__name__}")
    return _get(ALIASES.get(name.lower(), name.lower()))


@lru_cache(maxsize=None)  # formats are immutable: one instance (and its cached tables) per name
def _get(key: str) -> Format:
    if m := _INT_RE.match(key):
        bits = int(m.group(1))
        if 2 <= bits <= 8:
            return IntFormat(bits)
        raise ValueError(f"integer formats have 2 to 8 bits, got {key!r}")
    if m := _FLOAT_RE.match(key):
        n, e, mm = (int(g) for g in m.groups())
        if 1 + e + mm != n:
            raise ValueError(f"format {key!r}: 1 + E + M must equal the bit width {n} (got {1 + e + mm})")
        if e < 1 or n > 8 or n < 3:
            raise ValueError(f"format {key!r}: floating formats need E >= 1 and 3 <= 1+E+M <= 8")
        return FloatFormat(e, mm)
    raise ValueError(f"unknown format {key!r}: expected int2..int8, fpN_eEmM (1+E+M = N <= 8, E >= 1) "
                     f"or an alias ({', '.join(ALIASES)})")


def names() -> list[str]:
    """Every format name lowbit knows."""
    out = [f"int{b}" for b in range(2, 9)]
    for n in range(3, 9):
        out += [f"fp{n}_e{e}m{n - 1 - e}" for e in range(1, n)]
    return out
