"""The inline-PTX decoders, run on the CPU by a small PTX emulator (Triton's interpreter has no
inline asm, and GPU time is scarce): every code of every format, in fp16 and bf16, from words
packed by ``lowbit.pack``, must decode to the exact value the reference path computes."""

import re
import struct

import numpy as np
import pytest
import torch

from lowbit import formats, pack, sparsity
from lowbit.kernels import decoders

MASK32 = 0xFFFFFFFF


def _f16(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _to_f16(x: float) -> int:
    return int(np.array([x], dtype=np.float16).view(np.uint16)[0])


def _bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def _to_bf16(x: float) -> int:  # round to nearest even
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def _halves(op, a: int, b: int, c: int | None, fp16: bool) -> int:
    dec, enc = (_f16, _to_f16) if fp16 else (_bf16, _to_bf16)
    out = 0
    for h in (0, 16):
        x, y = dec((a >> h) & 0xFFFF), dec((b >> h) & 0xFFFF)
        z = None if c is None else dec((c >> h) & 0xFFFF)
        out |= enc(op(x, y, z)) << h
    return out


def _prmt(a: int, b: int, sel: int) -> int:
    data = a | b << 32
    return sum(((data >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_ptx(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """Execute the few PTX instructions the decoders use; ``$i`` operands: outputs then inputs."""
    regs = {f"${n_out + i}": v for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) & MASK32 if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok) else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        args = [t.strip() for t in rest.split(",")]
        d, src = args[0], [val(t) for t in args[1:]]
        if op == "mov.b32":
            r = src[0]
        elif op == "shl.b32":
            r = (src[0] << src[1]) & MASK32
        elif op == "shr.u32":
            r = src[0] >> src[1]
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "mad.lo.u32":
            r = (src[0] * src[1] + src[2]) & MASK32
        elif op == "lop3.b32":
            r = _lop3(*src)
        elif op == "prmt.b32":
            r = _prmt(*src)
        elif op in ("sub.f16x2", "sub.bf16x2"):
            r = _halves(lambda x, y, z: x - y, src[0], src[1], None, op == "sub.f16x2")
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            r = _halves(lambda x, y, z: x * y + z, *src, op == "fma.rn.f16x2")
        else:
            raise AssertionError(f"emulator: unknown instruction {op}")
        regs[d] = r
    return [regs[f"${i}"] for i in range(n_out)]


def _registers(words: torch.Tensor) -> list[int]:
    """Consecutive words packed into 32-bit registers, element 0 lowest (as Triton packs them)."""
    raw = words.contiguous().numpy().tobytes()
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def _tile_words(codes: torch.Tensor, bits: int, sparse: bool = False) -> list[torch.Tensor]:
    """Each segment's words of one row and tile ``[D]`` for ``codes [1, 128]`` (a 1-bit segment's 4-bit
    words split from their bytes, as the kernels do)."""
    depth = pack.plane_depth(bits)
    out = []
    for s, seg in zip(pack.SEGMENTS[bits], pack.pack_codes(codes, bits, sparse=sparse)):
        words = seg[0, :pack.segment_words(bits, s)]  # row 0, tile 0
        if words.numel() != depth:
            words = torch.stack([words & 15, words >> 4], dim=-1).reshape(depth)
        out.append(words)
    return out


def decode_tile(codes: torch.Tensor, bits: int, asm: str, n_out: int, planes: int, fp16: bool) -> torch.Tensor:
    """Decoded values of a 128-code tile through the asm, in k order."""
    segs = _tile_words(codes, bits)
    segs = segs + [segs[0]] * (3 - len(segs))
    depth = pack.plane_depth(bits)
    out = torch.empty(128, dtype=torch.float64)
    dec = _f16 if fp16 else _bf16
    for i0 in range(0, depth, decoders.PACK):
        inputs = [r for s in segs for r in _registers(s[i0:i0 + decoders.PACK])]
        regs = run_ptx(asm, inputs, n_out)
        for j in range(planes):
            for e in range(decoders.PACK):
                reg = regs[2 * j + e // 2]
                out[depth * j + i0 + e] = dec((reg >> (16 * (e % 2))) & 0xFFFF)
    return out


def all_codes_tiles(bits: int, code_shift: int = 0):
    """Tiles of 128 codes covering every code (value codes times every low part)."""
    n = 1 << bits
    codes = torch.arange(n, dtype=torch.int64)
    codes = codes.repeat(-(-128 // n) if n < 128 else 1)
    g = torch.Generator().manual_seed(bits)
    codes = codes[torch.randperm(codes.numel(), generator=g)]
    pad = -codes.numel() % 128
    codes = torch.cat([codes, codes[:pad]])
    return [c.view(1, 128).to(pack.code_dtype(bits)) for c in codes.split(128)]


FLOATS = ["fp8_e4m3", "fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp5_e3m1", "fp4_e2m1", "fp3_e1m1",
          "fp3_e2m0", "fp7_e3m3", "fp6_e1m4", "fp6_e4m1", "fp5_e4m0"]


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", FLOATS)
def test_float_planes_every_code(name, fp16):
    fmt = formats.get(name)
    asm, constraints, planes = decoders.planes_asm(fmt.bits, True, fmt.man_bits, fp16, None)
    n_out = constraints.count("=")
    factor = 2.0 ** (fmt.bias - 15)  # the decoders' values are true values times this
    for codes in all_codes_tiles(fmt.bits):
        got = decode_tile(codes, fmt.bits, asm, n_out, planes, fp16)
        want = fmt.decode(codes[0].to(torch.uint8)).to(torch.float64) * factor
        finite = torch.isfinite(want)  # e4m3fn's NaN codes are never produced
        assert torch.equal(got[finite], want[finite]), name


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "codes"])
def test_int_planes_every_code(bits, symmetric, fp16):
    if bits == 8 and not fp16:
        pytest.skip("8-bit codes do not fit bf16's 7-bit mantissa: plain Triton decodes them")
    zero = (1 << (bits - 1)) if symmetric else None
    asm, constraints, planes = decoders.planes_asm(bits, False, 0, fp16, zero)
    for codes in all_codes_tiles(bits):
        got = decode_tile(codes, bits, asm, constraints.count("="), planes, fp16)
        assert torch.equal(got, codes[0].to(torch.float64) - (zero or 0))


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["int4", "int8", "int6", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp8_e4m3"])
def test_sparse_planes_expand_every_pattern_and_code(name, fp16):
    """2:4 codes (``value << 2 | position``, packed with the position bits recoded): the decoder
    emits the dense operand, each kept value at its position and zeros elsewhere, for every pair of
    positions and every value code."""
    fmt = formats.get(name)
    if fmt.bits == 8 and not fmt.is_float and not fp16:
        pytest.skip("8-bit integer codes in bf16: plain Triton")
    bits = fmt.bits + 2
    zero = None if fmt.is_float else 1 << (fmt.bits - 1)
    asm, constraints, planes = decoders.planes_asm(bits, fmt.is_float, getattr(fmt, "man_bits", 0), fp16, zero,
                                                   sparse=True)
    assert constraints.count("=") == 4 * planes
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    depth = pack.plane_depth(bits)
    dec = _f16 if fp16 else _bf16
    g = torch.Generator().manual_seed(bits)
    for values in all_codes_tiles(fmt.bits):  # 128 kept values = 64 groups per tile
        positions = pairs[torch.randint(0, 6, (64,), generator=g)].reshape(1, 128)
        codes = sparsity.merge_codes(values, positions, fmt.bits)
        if fmt.is_float:
            kept = fmt.decode(values[0]).to(torch.float64) * 2.0 ** (fmt.bias - 15)
        else:
            kept = values[0].to(torch.float64) - zero
        want = torch.zeros(256, dtype=torch.float64).scatter_(0, sparsity.dense_columns(positions)[0], kept)
        segs = _tile_words(codes, bits, sparse=True)
        segs = segs + [segs[0]] * (3 - len(segs))
        for apart in (2, 8):  # the two pairs of a call: adjacent, or as Triton's matrix-operand layout holds them
            got = torch.empty(256, dtype=torch.float64)
            for i0 in range(0, depth, 2 * apart):
                for i in range(i0, i0 + apart, 2):
                    words = [i, i + 1, i + apart, i + apart + 1]  # stored columns of groups i/2 and (i+apart)/2
                    regs = run_ptx(asm, [r for s in segs for r in _registers(s[words])], 4 * planes)
                    for j in range(planes):
                        for r, (pair, first) in enumerate([(0, 0), (1, 0), (0, 2), (1, 2)]):
                            dense = 2 * (depth * j + words[2 * pair]) + first  # group's position 0 (or 2)
                            for h in range(2):
                                got[dense + h] = dec((regs[4 * j + r] >> (16 * h)) & 0xFFFF)
            finite = torch.isfinite(want)  # e4m3fn's NaN codes are never produced
            assert torch.equal(got[finite], want[finite]), (name, apart)


def test_sparse_asm_supported_widths():
    assert [b for b in sorted(pack.SEGMENTS) if b > 3 and decoders.sparse_asm_supported(b)] == [6, 8, 10]
    with pytest.raises(ValueError, match="case bits"):
        decoders.planes_asm(7, True, 2, True, None, sparse=True)


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "bf16"])
@pytest.mark.parametrize("zero", [8, None], ids=["sym", "codes"])
def test_int4_words_every_code(fp16, zero):
    asm = decoders.int4_words_asm(fp16, zero)
    dec = _f16 if fp16 else _bf16
    for codes in all_codes_tiles(4):
        words = _tile_words(codes, 4)[0]
        got = torch.empty(128, dtype=torch.float64)
        for i0 in range(0, 32, 2):  # two int16 words per call, one output register per plane
            regs = run_ptx(asm, _registers(words[i0:i0 + 2]), 4)
            for j in range(4):
                for e in range(2):
                    got[32 * j + i0 + e] = dec((regs[j] >> (16 * e)) & 0xFFFF)
        assert torch.equal(got, codes[0].to(torch.float64) - (zero or 0))


def test_five_bit_exponents_are_refused():
    """An exponent of 31 is inf/NaN in fp16: E = 5 formats cannot be decoded through fp16 patterns."""
    with pytest.raises(ValueError, match="E <= 4"):
        decoders.planes_asm(8, True, 2, True, None)


def test_emulator_catches_a_wrong_mask():
    """The emulator is not a rubber stamp: a decoder with one mask bit dropped fails."""
    fmt = formats.get("fp6_e3m2")
    asm, constraints, planes = decoders.planes_asm(6, True, 2, True, None)
    broken = asm.replace("0x80008000", "0x00008000", 1)
    assert broken != asm
    codes = all_codes_tiles(6)[0]
    got = decode_tile(codes, 6, broken, constraints.count("="), planes, True)
    want = fmt.decode(codes[0].to(torch.uint8)).to(torch.float64) * 2.0 ** (fmt.bias - 15)
    assert not torch.equal(got, want)
