"""Inline-PTX decoders: packed code words -> fp16/bf16 matrix operands in a few bit operations.

Each function returns the PTX of one ``tl.inline_asm_elementwise`` call (the interpreter has no
inline asm: there the kernels decode with plain Triton, :func:`..triton_matmul._decode`, the
same values). The generic :func:`planes_asm` serves every format; int4, int8 and e4m3 have
shorter special cases.

The idea throughout (MARLIN's, and TC-FPx's): never convert integers to floats. Two values'
bit fields sit at bits ``p`` and ``16 + p`` of one 32-bit register; one shift moves both to their
place in a half2 and one ``lop3`` masks them and ORs them into the result.

* floats ``eEmM`` (E <= 4): the sign goes to bit 15 and exponent/mantissa to the low end of the
  half's exponent and the top of its mantissa. The half is then the true value times
  ``2^(bias_half - bias)`` (subnormals included); bf16 then multiplies by ``2^(127 - 15)`` so that
  both dtypes hold the value times ``2^(15 - bias)``, a factor folded into the scale.
* integers: the code goes into the mantissa of a half whose ulp is 1 (fp16 1024.0, bf16 128.0)
  and one packed subtraction removes that float and, for symmetric schemes, the zero point.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from .. import pack as _pack

__all__ = ["planes_asm", "sparse_asm_supported", "int4_words_asm", "int8_fp16_asm", "e4m3_fp16_asm", "PACK"]

PACK = 4  # values per inline-asm call of planes_asm: 4 consecutive k of every plane
_LOP3_AND_OR = "0xEA"  # lop3 truth table of (a & b) | c


def _half(value: float, fp16: bool) -> int:
    """Bits of ``value`` as fp16, or as bf16 (``value`` exact in bf16)."""
    if fp16:
        return struct.unpack("<H", struct.pack("<e", value))[0]
    return struct.unpack("<I", struct.pack("<f", value))[0] >> 16


def _pair(bits: int) -> str:
    return f"0x{bits:04x}{bits:04x}"


def _targets(bits: int, is_float: bool, man_bits: int, fp16: bool) -> list[int]:
    """Bit of the half that code bit ``c`` goes to, for c = 0 .. bits-1."""
    if not is_float:
        return list(range(bits))
    low = (10 if fp16 else 7) - man_bits  # mantissa bits under the half's mantissa top, exponent above
    return [low + c for c in range(bits - 1)] + [15]


@lru_cache(maxsize=None)  # pure, and the dispatcher asks on every call: ~140 us of Python each time
def planes_asm(bits: int, is_float: bool, man_bits: int, fp16: bool, symmetric_zero: int | None,
               sparse: bool = False) -> tuple[str, str, int]:
    """PTX decoding ``PACK`` consecutive k of every plane of a ``bits``-bit tile at once.

    Inputs: the segment words of the ``PACK`` values, each segment in as many 32-bit registers as
    its words take (bytes: 1, int16: 2), three segments always (a format with fewer
    passes its first segment again, unused). Outputs: per plane two registers of two halves (k and
    k+1, then k+2 and k+3).

    ``sparse``: 2:4 codes ``value << 2 | case`` (:mod:`lowbit.pack`): the 4 stored values are two
    groups (v0 v1 each, in consecutive columns: any two pairs), and the outputs are per plane four
    registers: the dense pairs 0-1 of both groups, then their pairs 2-3 (:func:`_expand_2of4_lines`);
    only :func:`sparse_asm_supported` codes.
    Returns (asm, constraints, planes)."""
    code_shift = 2 if sparse else 0
    if sparse and not sparse_asm_supported(bits):
        raise ValueError(f"{bits}-bit 2:4 codes: the case bits are not a byte-word segment of their own")
    if is_float and bits - code_shift - 1 - man_bits > 4:
        raise ValueError("the kernels decode floats through fp16 exponents: E <= 4 (E = 5 needs fp16's inf/NaN codes)")
    segments = _pack.SEGMENTS[bits]
    depth = _pack.plane_depth(bits)
    planes = _pack.TILE_K // depth
    word_bits = [max(8, s * _pack.TILE_K // depth) for s in segments]  # (a 1-bit segment's 4-bit words: a byte each)
    value_bits = bits - code_shift
    targets = _targets(value_bits, is_float, man_bits, fp16)
    n_out = (4 if sparse else 2) * planes
    regs, operand = [], n_out  # input registers per segment, numbered after the outputs
    for i in range(3):
        wb = word_bits[i] if i < len(segments) else word_bits[0]
        regs.append([f"${operand + r}" for r in range(PACK * wb // 32)])
        operand += PACK * wb // 32
    lines, temps, pairs = [], 0, {}

    def temp() -> str:
        nonlocal temps
        temps += 1
        return f"t{temps}"

    def pair_register(seg: int, q: int, bit: int) -> tuple[str, int]:
        """A register with the words of values 2q and 2q+1 of segment ``seg`` at bits 0.. and
        16.. (as far as bit ``bit`` of a word goes), and where that bit then sits."""
        if word_bits[seg] == 16:
            return regs[seg][q], bit
        key = (seg, q)
        if key not in pairs:  # bytes: one register holds the 4 values'; values 2q, 2q+1 to bytes 0 and 2
            pairs[key] = temp()
            selector = 0x1100 if q == 0 else 0x3322
            lines.append(f"prmt.b32 {pairs[key]}, {regs[seg][0]}, {regs[seg][0]}, 0x{selector:04x};")
        return pairs[key], bit

    magic = None if is_float else _half(1024.0 if fp16 else 128.0, fp16)
    for j in range(planes):
        for q in range(2):
            out = f"v{2 * j + q}" if sparse else f"${2 * j + q}"
            fields = []  # (segment, first word bit, width, first target bit), code bits low to high
            shift = bits
            for seg, s in enumerate(segments):
                shift -= s
                for b in range(s):
                    c = shift + b - code_shift  # value bit held by bit b of this segment
                    if c < 0:
                        continue
                    src, dst = s * j + b, targets[c]
                    last = fields[-1] if fields else None
                    if last and last[0] == seg and last[1] + last[2] == src and last[3] + last[2] == dst:
                        fields[-1] = (seg, last[1], last[2] + 1, last[3])
                    else:
                        fields.append((seg, src, 1, dst))
            acc = None
            for seg, src, width, dst in fields:
                reg, at = pair_register(seg, q, src)
                moved = reg
                if dst != at:
                    moved = temp()
                    op = f"shl.b32 {moved}, {reg}, {dst - at}" if dst > at else f"shr.u32 {moved}, {reg}, {at - dst}"
                    lines.append(op + ";")
                mask = _pair(((1 << width) - 1) << dst)
                if acc is None:
                    base = _pair(magic) if magic is not None else "0"
                    lines.append(f"lop3.b32 {out}, {moved}, {mask}, {base}, {_LOP3_AND_OR};")
                else:
                    lines.append(f"lop3.b32 {out}, {moved}, {mask}, {out}, {_LOP3_AND_OR};")
                acc = out
            if magic is not None:
                lines.append(f"sub.{'f16x2' if fp16 else 'bf16x2'} {out}, {out}, c;")
            elif not fp16:  # to fp16's scale: bf16's tiny exponents would underflow in the products
                lines.append(f"fma.rn.bf16x2 {out}, {out}, c, z;")
    values = [f"v{i}" for i in range(2 * planes)] if sparse else []
    if sparse:
        lines += _expand_2of4_lines(regs[len(segments) - 1][0], segments[-1], planes)
    # (f16x2 operands: registers only)
    decl = [f".reg .b32 c, z{''.join(f', t{i + 1}' for i in range(temps))}{''.join(', ' + v for v in values)};"]
    if sparse:
        decl += _EXPAND_DECL
    if magic is not None:
        decl.append(f"mov.b32 c, {_pair(_half((1024.0 if fp16 else 128.0) + (symmetric_zero or 0), fp16))};")
    elif not fp16:
        decl += [f"mov.b32 c, {_pair(_half(2.0 ** 112, False))};", "mov.b32 z, 0x80008000;"]
    asm = "{\n" + "\n".join(decl + lines) + "\n}"
    constraints = ",".join(["=r"] * n_out + ["r"] * (operand - n_out))
    return asm, constraints, planes


def sparse_asm_supported(code_bits: int) -> bool:
    """Whether :func:`planes_asm` expands these 2:4 codes: their two low (case) bits must sit in a
    segment of byte words (one register holds the 4 stored values' bytes): 6-bit (4+2), 8-bit (8) and
    10-bit (4+4+2) codes, i.e. 4, 6 and 8-bit formats."""
    segments = _pack.SEGMENTS[code_bits]
    return segments[-1] >= 2 and segments[-1] * _pack.TILE_K // _pack.plane_depth(code_bits) == 8


# Byte-permute selectors of a dense pair from (v0, v1) = a and zeros = b: "v0 v1" 0x3210, "v0 0"
# 0x5410, "0 v0" 0x1054, "0 0" 0x5454, "v1 0" 0x5432, "0 v1" 0x3254. Tables of the pair 0-1's cases
# (0..3: v0 v1, v0 0, 0 v0, 0 0) and the pair 2-3's (0 0, v1 0, 0 v1, v0 v1): low selector bytes in
# register a, high ones in b, so that nibbles (case, 4 + case) look a selector up.
_EXPAND_DECL = [".reg .b32 m, u, l0, l1, zz, s0a, s0b, s1a, s1b;", "mov.b32 zz, 0;",
                "mov.b32 s0a, 0x54541010;", "mov.b32 s0b, 0x54105432;",
                "mov.b32 s1a, 0x10543254;", "mov.b32 s1b, 0x32325454;"]


def _expand_2of4_lines(meta: str, width: int, planes: int) -> list[str]:
    """PTX of the dense operand of each plane from its decoded kept values ``v{2j}`` (group g: v0 v1)
    and ``v{2j+1}`` (group g') and the case bits: byte e of ``meta`` holds stored value e's at bits
    ``width * j`` (c0(g), c1(g), c0(g'), c1(g')). 13 instructions per 8 dense values."""
    lines = []
    for j in range(planes):
        src = meta
        if width * j:
            lines.append(f"shr.u32 m, {meta}, {width * j};")
            src = "m"
        lines += [f"and.b32 m, {src}, 0x03030303;",
                  "mad.lo.u32 u, m, 0x11, 0x40404040;",  # byte e: nibbles (case_e, 4 + case_e)
                  "prmt.b32 l0, u, zz, 0x0020;",  # the c0 bytes (of g and g')
                  "prmt.b32 l1, u, zz, 0x0031;",  # the c1 bytes
                  "prmt.b32 l0, s0a, s0b, l0;",  # selectors of pair 0-1: g (low half), g' (high)
                  "prmt.b32 l1, s1a, s1b, l1;",  # pair 2-3
                  f"prmt.b32 ${4 * j}, v{2 * j}, zz, l0;",
                  f"prmt.b32 ${4 * j + 2}, v{2 * j}, zz, l1;",
                  "shr.u32 l0, l0, 16;",
                  "shr.u32 l1, l1, 16;",
                  f"prmt.b32 ${4 * j + 1}, v{2 * j + 1}, zz, l0;",
                  f"prmt.b32 ${4 * j + 3}, v{2 * j + 1}, zz, l1;"]
    return lines


@lru_cache(maxsize=None)
def int4_words_asm(fp16: bool, symmetric_zero: int | None) -> str:
    """PTX turning two int16 words of 4-bit codes (4 planes each: bits 4j..4j+3 hold plane j) into
    the 4 planes' values, two per output register: ``(word & 0x000F000F) | magic`` is a half2
    whose ulp is 1, and one packed subtraction removes the magic and the zero point. fp16 takes
    planes 1 and 3 unshifted as ``1024 + 16 v`` and removes the factor with one fused multiply-add:
    9 instructions per 8 values (bf16: 11). Outputs ``$0..$3`` = planes 0..3; input ``$4``."""
    zero = symmetric_zero or 0
    if fp16:
        sub, sixteenth, hi_sub = _half(1024 + zero, True), _half(1 / 16, True), _half(-(64 + zero), True)
        lines = [".reg .b32 r, c, d, e;", f"mov.b32 c, {_pair(sub)};", f"mov.b32 d, {_pair(sixteenth)};",
                 f"mov.b32 e, {_pair(hi_sub)};", "shr.u32 r, $4, 8;"]
        for out, src, mask in [(0, "$4", "0x000F000F"), (1, "$4", "0x00F000F0"), (2, "r", "0x000F000F"),
                               (3, "r", "0x00F000F0")]:
            lines.append(f"lop3.b32 ${out}, {src}, {mask}, 0x64006400, {_LOP3_AND_OR};")
        lines += ["sub.f16x2 $0, $0, c;", "fma.rn.f16x2 $1, $1, d, e;", "sub.f16x2 $2, $2, c;",
                  "fma.rn.f16x2 $3, $3, d, e;"]
    else:
        sub = _half(128 + zero, False)
        lines = [".reg .b32 r, c;", f"mov.b32 c, {_pair(sub)};",
                 f"lop3.b32 $0, $4, 0x000F000F, 0x43004300, {_LOP3_AND_OR};"]
        for out in (1, 2, 3):
            lines += [f"shr.u32 r, $4, {4 * out};", f"lop3.b32 ${out}, r, 0x000F000F, 0x43004300, {_LOP3_AND_OR};"]
        lines += [f"sub.bf16x2 ${i}, ${i}, c;" for i in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


@lru_cache(maxsize=None)
def int8_fp16_asm(symmetric_zero: int | None) -> str:
    """PTX turning 4 uint8 codes (one register) into 4 fp16 values: two byte permutes place each code
    in the mantissa of 1024.0, two packed subtractions remove 1024 (+ the symmetric zero point)."""
    sub = _half(1024 + (symmetric_zero or 0), True)
    return ("{\n.reg .b32 a, b, c;\n"
            f"mov.b32 c, {_pair(sub)};\n"
            "prmt.b32 a, $2, 0x64646464, 0x5140;\n"
            "prmt.b32 b, $2, 0x64646464, 0x7362;\n"
            "sub.f16x2 $0, a, c;\nsub.f16x2 $1, b, c;\n}")


@lru_cache(maxsize=None)
def e4m3_fp16_asm() -> str:
    """PTX turning 4 fp8 e4m3 codes (one register) into 4 fp16 values with the hardware's exact
    paired conversion (sm_89+): the true values, so the float decode factor is 1."""
    return ("{\n.reg .b16 lo, hi;\n"
            "mov.b32 {lo, hi}, $2;\n"
            "cvt.rn.f16x2.e4m3x2 $0, lo;\n"
            "cvt.rn.f16x2.e4m3x2 $1, hi;\n}")
