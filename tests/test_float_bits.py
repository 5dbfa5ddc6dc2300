"""The PRMT assembly of kernels/triton/float_bits.py, run on a model of the PTX instructions it uses (as the PTX ISA
defines them), against the definition: every byte value in every position of the packed register gives the bits of
2^23 + v. Without a GPU the kernels take the portable twins (tests/test_triton_kernels.py); this checks the text the
GPU runs. tests/test_triton_compile.py checks that it compiles, a CUDA run that it decodes bit-identically."""

import re

import numpy as np
import pytest
import torch

from kernels.formats import IQ4_VALUES, NF4_VALUES
from kernels.triton.float_bits import (BF16_INT_WORDS_AT, BYTE_SELECTOR, HALF_BITS_AT, HALF_WORDS_AT,
                                       IQ4_INT8_WORDS_AT, IQ4_VALUES_AT, IQ4_WORDS_AT, LOOKUP_WORDS,
                                       NF4_HALF_VALUES_AT, NF4_HALF_WORDS, NF4_HALF_WORDS_AT, NF4_LEVEL_SCALE,
                                       NF4_WORDS_AT, PTX_SOURCES, _assemble, _shift_right_ptx, sum_tables)
from kernels.triton.int_gemv import _dp2a_ptx

MASK = 0xFFFFFFFF


def prmt(a: int, b: int, c: int) -> int:
    """prmt.b32 in its default mode: byte i of the result is byte (c's nibble i & 7) of {b, a}, or that byte's sign
    replicated where the nibble's bit 3 is set."""
    source = (b << 32) | a
    result = 0
    for i in range(4):
        control = (c >> (4 * i)) & 0xF
        byte = (source >> (8 * (control & 7))) & 0xFF
        if control & 8:
            byte = 0xFF if byte & 0x80 else 0
        result |= byte << (8 * i)
    return result


def float32_of(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def bits_of(value: np.float32) -> int:
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def bf16_bits(bits: int) -> int:
    """float32 -> bf16, rounded to nearest even (torch's conversion, an independent reference)."""
    return int(torch.tensor([float32_of(bits)]).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def signed(value: int, bits: int) -> int:
    return value - (1 << bits) if (value >> (bits - 1)) & 1 else value


def dp2a(high: bool):
    """dp2a.lo / .hi with .s32.s32: c + a's signed 16-bit halves times b's signed bytes 0, 1 (hi: 2, 3)."""
    def op(a: int, b: int, c: int) -> int:
        first = 2 if high else 0
        products = (signed((a >> (16 * i)) & 0xFFFF, 16) * signed((b >> (8 * (first + i))) & 0xFF, 8)
                    for i in range(2))
        return signed(c, 32) + sum(products)
    return op


def bf16_bits_of_float64(value: float) -> int:
    """float64 -> bf16, rounded to nearest even once (not through float32): exact for the sums of bf16 products
    `fma.rn.bf16x2` forms here, whose terms lie within 2^36 of each other."""
    bits = int(np.array([value], dtype=np.float64).view(np.uint64)[0])
    bits += (1 << 44) - 1 + ((bits >> 45) & 1)
    rounded = np.array([bits & ~((1 << 45) - 1)], dtype=np.uint64).view(np.float64)[0]
    return bf16_bits(bits_of(np.float32(rounded)))  # both conversions exact: 8 significant bits


def bf16x2_fma(a: int, b: int, c: int) -> int:
    """fma.rn.bf16x2: a * b + c in each bf16 half, rounded once."""
    halves = [[float(float32_of(((x >> shift) & 0xFFFF) << 16)) for shift in (0, 16)] for x in (a, b, c)]
    low, high = (bf16_bits_of_float64(halves[0][i] * halves[1][i] + halves[2][i]) for i in range(2))
    return low | (high << 16)


def f16x2(operation):
    """An f16x2 instruction: `operation` on the f16 halves of a and b, each result rounded to nearest once (numpy's
    f16 arithmetic: the exact float32 result of two f16 operands, rounded)."""
    def op(a: int, b: int) -> int:
        halves = [np.array([(x >> shift) & 0xFFFF for shift in (0, 16)], dtype=np.uint16).view(np.float16)
                  for x in (a, b)]
        result = operation(halves[0].astype(np.float32), halves[1].astype(np.float32)).astype(np.float16)
        low, high = (int(v) for v in result.view(np.uint16))
        return low | (high << 16)
    return op


OPS = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "xor.b32": lambda a, b: a ^ b,
       "shr.b32": lambda a, b: a >> b, "shl.b32": lambda a, b: a << b, "mul.lo.u32": lambda a, b: a * b,
       "mul.hi.u32": lambda a, b: (a * b) >> 32,
       "add.u32": lambda a, b: a + b, "mad.lo.u32": lambda a, b, c: a * b + c,
       "mov.b32": lambda a: a, "prmt.b32": prmt, "dp2a.lo.s32.s32": dp2a(False), "dp2a.hi.s32.s32": dp2a(True),
       "mul.f32": lambda a, b: bits_of(float32_of(a) * float32_of(b)),  # round to nearest, subnormals kept
       # d = {a rounded in the upper half, b in the lower}
       "cvt.rn.bf16x2.f32": lambda a, b: (bf16_bits(a) << 16) | bf16_bits(b),
       "sub.f16x2": f16x2(np.subtract), "mul.f16x2": f16x2(np.multiply), "fma.rn.bf16x2": bf16x2_fma}


def _value(operand: str, registers: dict[str, int]) -> int:
    if operand.startswith("0f"):  # a float32 immediate by its bits
        return int(operand[2:], 16)
    if re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)", operand):
        return int(operand, 0)
    return registers[operand]


def run_ptx(source: str, operands: dict[str, int]) -> dict[str, int]:
    """Executes `source` (one instruction a line, braces and .reg declarations) on 32-bit registers, and `mov` of a
    wider register into a `{low, high}` vector of halves; `operands` gives the $n inputs (64 bits where the asm
    takes 64), the result holds every register written."""
    registers = dict(operands)
    for line in source.splitlines():
        line = line.split("//")[0].strip()
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        opcode, rest = line.rstrip(";").split(None, 1)
        if rest.startswith("{"):  # mov.b64 {a, b}, c / mov.b32 {a, b}, c: c's low half to a, its high half to b
            vector, source_register = rest[1:].split("}, ")
            width = {"mov.b64": 32, "mov.b32": 16}[opcode]
            value = registers[source_register]
            for i, name in enumerate(part.strip() for part in vector.split(",")):
                registers[name] = (value >> (width * i)) & ((1 << width) - 1)
            continue
        destination, *args = [part.strip() for part in rest.split(",")]
        registers[destination] = OPS[opcode](*(_value(a, registers) for a in args)) & MASK
    return registers


def pack(values) -> int:
    """Four bytes in one register, the first in the lowest bits (as Triton packs them)."""
    return int.from_bytes(bytes(int(v) for v in values), "little")


def float_bits(v: int) -> int:
    return 0x4B000000 | v


def bits_128(v: int) -> int:
    """The 128 form: 128 + v (v < 128)."""
    assert np.uint32(0x43000000 | v << 16).view(np.float32) == np.float32(128 + v)
    return 0x43000000 | v << 16


def bits_128_of_byte(b: int) -> int:
    """The 128 form of a byte of any value: 128 + b / 256."""
    assert np.uint32(0x43000000 | b << 8).view(np.float32) == np.float32(128 + b / 256)
    return 0x43000000 | b << 8


FORMS = {"": float_bits, " 128": bits_128}
BYTE_FORMS = {"": float_bits, " 128": bits_128_of_byte}


@pytest.mark.parametrize("form", BYTE_FORMS)
def test_int8_bits(form):
    for first in range(256):  # every code in every position
        codes = [(first + 37 * i) % 256 for i in range(4)]
        out = run_ptx(PTX_SOURCES["int8" + form], {"$4": pack(codes)})
        int8 = np.asarray(codes, dtype=np.uint8).view(np.int8)
        assert [out[f"${i}"] for i in range(4)] == [BYTE_FORMS[form](int(v) + 128) for v in int8]


def test_byte_bits():
    """The K-quants' 6-bit scales, a byte of a word each: every byte value in every position."""
    for first in range(256):
        values = [(first + 71 * i) % 256 for i in range(4)]
        for index in range(4):
            out = run_ptx(PTX_SOURCES["byte"], {"$1": pack(values), "$2": BYTE_SELECTOR.value + index})
            assert out["$0"] == float_bits(values[index])


def test_shift_right_is_a_logical_shift():
    """`shift_right`'s multiply-high by 2^(32 - k), and `_assemble`'s rewrite of the asm's constant shifts."""
    words = [0, 1, 0x80000000, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF]
    for k in range(1, 32):
        for word in words:
            assert run_ptx(_shift_right_ptx(k), {"$1": word})["$0"] == word >> k
            assert run_ptx(_assemble([f"shl.b32 $0, $1, {k};"]), {"$1": word})["$0"] == (word << k) & MASK
            assert run_ptx(_assemble([f"shr.b32 $0, $1, {k};"]), {"$1": word})["$0"] == word >> k


NF4_BITS = [int(b) for b in np.asarray(NF4_VALUES, dtype=np.float32).view(np.uint32)]
# the words each asm takes as operands from $9 on (byte tables, then `_lookups`' half_bits), as the kernels pass them
HALF_BITS = (LOOKUP_WORDS[HALF_BITS_AT],)
TABLE_WORDS = {"nibble": [], "nibble 128": [], "nibble iq4": LOOKUP_WORDS[IQ4_WORDS_AT:IQ4_WORDS_AT + 4] + HALF_BITS,
               "nibble iq4 128": LOOKUP_WORDS[IQ4_WORDS_AT:IQ4_WORDS_AT + 4] + HALF_BITS,
               "nibble nf4": LOOKUP_WORDS[NF4_WORDS_AT:NF4_WORDS_AT + 16] + HALF_BITS}


def test_lookup_words_hold_the_code_book_values():
    # the portable twins and the blocks decoder gather NF4 values from the start of the same table, IQ4's from theirs
    assert list(LOOKUP_WORDS[:16]) == NF4_BITS
    iq4 = np.array(LOOKUP_WORDS[IQ4_VALUES_AT:IQ4_VALUES_AT + 16], dtype=np.uint32).view(np.float32)
    assert iq4.tolist() == list(IQ4_VALUES)


@pytest.mark.parametrize("name,table", [("nibble", [float_bits(v) for v in range(16)]),
                                        ("nibble 128", [bits_128(v) for v in range(16)]),
                                        ("nibble iq4", [float_bits(v + 128) for v in IQ4_VALUES]),
                                        ("nibble iq4 128", [bits_128_of_byte(v + 128) for v in IQ4_VALUES]),
                                        ("nibble nf4", NF4_BITS)])
def test_nibble_lookups_every_code_in_every_position(name, table):
    words = {f"${9 + i}": word for i, word in enumerate(TABLE_WORDS[name])}
    # every code as the low and the high nibble of every byte, next to every other code
    for low_code in range(16):
        for high_code in range(16):
            for position in range(4):
                codes = [(3 * position + 5 * i) % 256 for i in range(4)]
                codes[position] = low_code | (high_code << 4)
                out = run_ptx(PTX_SOURCES[name], {"$8": pack(codes), **words})
                assert [out[f"${i}"] for i in range(4)] == [table[c & 15] for c in codes]
                assert [out[f"${i + 4}"] for i in range(4)] == [table[c >> 4] for c in codes]


def test_iq4_int8_lookups_every_code_in_every_position():
    """IQ4's levels as int8 bytes for `int_gemv`: elements 0-3 in $0, 4-7 in $1."""
    words = {f"${3 + i}": word for i, word in enumerate(LOOKUP_WORDS[IQ4_INT8_WORDS_AT:IQ4_INT8_WORDS_AT + 4])}
    words["$7"] = LOOKUP_WORDS[HALF_BITS_AT]
    levels = [v & 0xFF for v in IQ4_VALUES]
    for low_code in range(16):
        for high_code in range(16):
            for position in range(4):
                codes = [(3 * position + 5 * i) % 256 for i in range(4)]
                codes[position] = low_code | (high_code << 4)
                out = run_ptx(PTX_SOURCES["nibble iq4 int8"], {"$2": pack(codes), **words})
                elements = [levels[(c >> (4 * half)) & 15] for c in codes for half in range(2)]
                assert [out["$0"], out["$1"]] == [pack(elements[:4]), pack(elements[4:])]


@pytest.mark.parametrize("high", [False, True])
def test_dp2a(high):
    """`int_gemv.dot2`'s PTX against the definition in numpy: signed 16-bit x times signed bytes, extremes
    included."""
    rng = np.random.default_rng(int(high))
    xs = [0, 0x7FFF8000, 0x80007FFF, 0xFFFFFFFF] + [int(v) for v in rng.integers(0, 2**32, 200, dtype=np.uint64)]
    codes = [0x7F80FF01, 0x80808080, 0x7F7F7F7F, 0] + [int(v) for v in rng.integers(0, 2**32, 200, dtype=np.uint64)]
    accs = [0, 2**31 - 2**24, 2**32 - 2**24, 5] + [int(v) for v in rng.integers(0, 2**20, 200)]
    for x, code, acc in zip(xs, codes, accs):
        halves = np.array([x], dtype=np.uint32).view(np.int16).astype(np.int64)
        bytes_ = np.array([code], dtype=np.uint32).view(np.int8).astype(np.int64)[2 * high:2 * high + 2]
        expected = (int(np.array([acc], dtype=np.uint32).view(np.int32)[0]) + int(halves @ bytes_)) & MASK
        assert run_ptx(_dp2a_ptx(high), {"$1": x, "$2": code, "$3": acc})["$0"] == expected


def spread_third_bits(third: int, others: int) -> int:
    """Q3_K's 16 third bits (bit e: element e) as its decoders take them: bit i of byte b is element 4b + i's, and
    bits 4-7 of each byte hold another 16 elements' (`others`, spread the same way), as its planes do."""
    return sum(((third >> e) & 1) << (8 * (e // 4) + e % 4) | ((others >> e) & 1) << (8 * (e // 4) + e % 4 + 4)
               for e in range(16))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name,has_third", [("three bit", True), ("two bit", False)])
def test_two_bit_fields(name, has_third, seed, form):
    """Q3_K's 2-bit fields with their third bits (the other 16 elements' in the word around them), Q2_K's alone, 16
    elements a word."""
    rng = np.random.default_rng(seed)
    words = [0, 0xFFFFFFFF] + [int(w) for w in rng.integers(0, 2**32, 62, dtype=np.uint64)]
    thirds = [0xFFFF, 0] + [int(h) for h in rng.integers(0, 2**16, 62)]
    others = [0, 0xFFFF] + [int(h) for h in rng.integers(0, 2**16, 62)]
    for low, third, other in zip(words, thirds, others):
        operands = {"$16": low, "$17": spread_third_bits(third, other)} if has_third else {"$16": low}
        out = run_ptx(PTX_SOURCES[name + form], operands)
        expected = [FORMS[form](((low >> (2 * e)) & 3) | (has_third * ((third >> e) & 1) << 2)) for e in range(16)]
        assert [out[f"${e}"] for e in range(16)] == expected


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name,top_bits", [("five bit", 1), ("six bit", 2)])
def test_eight_codes_with_top_bits(name, top_bits, seed, form):
    """The Q5 formats (1 top bit an element) and Q6_K (2), 8 elements a word: over the four seeds every top-bits
    value (each element's top bits in every value, next to every other), with random and extreme words of low
    bits."""
    rng = np.random.default_rng(seed)
    tops = list(range(seed, 1 << (8 * top_bits), 4))
    words = [0, 0xFFFFFFFF] + [int(w) for w in rng.integers(0, 2**32, len(tops) - 2, dtype=np.uint64)]
    mask = (1 << top_bits) - 1
    for low, top in zip(words, tops):
        out = run_ptx(PTX_SOURCES[name + form], {"$8": low, "$9": top})
        expected = [FORMS[form](((low >> (4 * e)) & 15) | (((top >> (top_bits * e)) & mask) << 4)) for e in range(8)]
        assert [out[f"${e}"] for e in range(8)] == expected


def code_book_bf16_expected(values, codes, scale: np.float32) -> list[int]:
    """What decoding to float32 and converting gives: bf16(float32(value[code] * scale))."""
    weights = np.asarray(values, dtype=np.float32)[np.asarray(codes)] * np.float32(scale)
    return [int(v) & 0xFFFF for v in torch.from_numpy(weights).to(torch.bfloat16).view(torch.int16)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name,values", [("nf4 bf16", NF4_VALUES), ("iq4 bf16", IQ4_VALUES)])
def test_code_book_bf16_every_code_in_every_position(name, values, seed):
    rng = np.random.default_rng(seed)
    # scales of every size and sign (IQ4_XS's sub-block scales are negative too): rounding ties and carries into the
    # exponent, subnormal products, the largest normals
    scales = [np.float32(1.0), np.float32(3.0e38), np.float32(1e-39), np.float32(2.0**-130), np.float32(-2.5)] + \
        list(rng.lognormal(0, 8, 60).astype(np.float32)) + list(rng.uniform(-1, 1, 60).astype(np.float32))
    if name == "nf4 bf16":  # NF4's scale is an absolute maximum, never negative
        scales = [abs(scale) for scale in scales]
    for i, scale in enumerate(scales):
        codes = np.roll(rng.permutation(16), i)
        word = sum(int(c) << (4 * e) for e, c in enumerate(codes))
        out = run_ptx(PTX_SOURCES[name], {"$16": word, "$17": bits_of(scale), "$18": LOOKUP_WORDS[HALF_BITS_AT]})
        assert [out[f"${e}"] for e in range(16)] == code_book_bf16_expected(values, codes, scale), scale


@pytest.mark.parametrize("seed", range(3))
def test_iq4_half_weights_every_code_in_every_position(seed):
    """IQ4's f16 weights (`qmatmul.qmv_kernel`'s HALF_WEIGHTS): level * scale rounded once, every code in every
    position, for f16 scales of every size and sign, subnormal and the largest included."""
    rng = np.random.default_rng(seed)
    scales = np.concatenate([np.array([1.0, -1.0, 65504.0, 2.0**-24, 2.0**-14, -3.0e-3, 255.5], dtype=np.float16),
                             rng.lognormal(0, 6, 40).astype(np.float16), rng.uniform(-300, 300, 40).astype(np.float16)])
    words = {f"${10 + i}": word for i, word in enumerate(LOOKUP_WORDS[IQ4_WORDS_AT:IQ4_WORDS_AT + 4])}
    words |= {"$14": LOOKUP_WORDS[HALF_BITS_AT], "$15": LOOKUP_WORDS[HALF_WORDS_AT],
              "$16": LOOKUP_WORDS[HALF_WORDS_AT + 1]}
    for i, scale in enumerate(scales):
        bits = int(scale.view(np.uint16))
        for codes in (np.roll(np.arange(8), i), np.roll(np.arange(8, 16), i)):
            word = sum(int(c) << (4 * e) for e, c in enumerate(codes))
            out = run_ptx(PTX_SOURCES["iq4 f16"], {"$8": word, "$9": bits | (bits << 16), **words})
            expected = (np.asarray(IQ4_VALUES, dtype=np.float32)[codes] * np.float32(scale)).astype(np.float16)
            assert [out[f"${e}"] for e in range(8)] == [int(v) for v in expected.view(np.uint16)], scale


def nf4_half_levels_expected() -> list[int]:
    """f16(NF4_LEVEL_SCALE * value) by torch's rounding (float32 product, then f16), zero as -0."""
    scaled = torch.tensor(NF4_VALUES, dtype=torch.float32) * torch.tensor(NF4_LEVEL_SCALE, dtype=torch.float32)
    bits = [int(b) & 0xFFFF for b in scaled.to(torch.float16).view(torch.int16)]
    return [0x8000 if value == 0 else b for value, b in zip(NF4_VALUES, bits)]


@pytest.mark.parametrize("seed", range(3))
def test_nf4_half_levels_every_code_in_every_position(seed):
    """NF4's f16 levels for the split-K kernel (`qmatmul.qmv_kernel`'s LEVEL_TILES): two lookups and a sum a byte,
    every code in every position, and every pair of codes side by side (the sums' carries cross into the next
    element's byte)."""
    rng = np.random.default_rng(seed)
    words = {f"${9 + i}": word for i, word in enumerate(LOOKUP_WORDS[NF4_HALF_WORDS_AT:NF4_HALF_WORDS_AT + 10])}
    expected = nf4_half_levels_expected()
    pairs = [(a, b) for a in range(16) for b in range(16)]
    codings = [np.roll(np.arange(16), i)[:8] for i in range(16)] + [rng.integers(0, 16, 8) for _ in range(64)]
    codings += [np.array([a, b] * 4) for a, b in pairs] + [np.array([7, a, b, 7, 8, b, a, 15]) for a, b in pairs[::5]]
    for codes in codings:
        word = sum(int(c) << (4 * e) for e, c in enumerate(codes))
        out = run_ptx(PTX_SOURCES["nf4 half"], {"$8": word, **words})
        assert [out[f"${e}"] for e in range(8)] == [expected[c] for c in codes], codes


def test_nf4_half_levels_are_the_levels_to_f16_precision():
    """The scaled levels divided by the scale are NF4's to within f16's rounding (2^-11 of each), and the portable
    twin's table holds the same values as the asm's."""
    expected = np.asarray(nf4_half_levels_expected(), dtype=np.uint16).view(np.float16).astype(np.float64)
    levels = np.asarray(NF4_VALUES, dtype=np.float64)
    assert (np.abs(expected / NF4_LEVEL_SCALE - levels) <= 2.0**-11 * np.abs(levels)).all()
    portable = np.asarray(LOOKUP_WORDS[NF4_HALF_VALUES_AT:NF4_HALF_VALUES_AT + 16], dtype=np.uint32).view(np.float32)
    assert (portable.astype(np.float64) == expected).all()
    copies = [LOOKUP_WORDS[NF4_HALF_WORDS_AT + NF4_HALF_WORDS * q:NF4_HALF_WORDS_AT + NF4_HALF_WORDS * (q + 1)]
              for q in range(4)]  # one a lane of the quad (`float_bits._words_by_quarter`)
    assert copies[0] == copies[1] == copies[2] == copies[3]
    assert len(LOOKUP_WORDS) == NF4_HALF_WORDS_AT + 4 * NF4_HALF_WORDS


def test_sum_tables_refuse_entries_on_one_side_of_128():
    assert sum_tables([0] * 8 + [200] * 8) == ([128] * 8, [73] * 8)
    with pytest.raises(ValueError, match="straddle"):
        sum_tables([3] * 16)
    with pytest.raises(ValueError, match="straddle"):
        sum_tables([0] * 8 + [255] * 8)


def bf16_bits_of_int(value: int) -> int:
    return bf16_bits(bits_of(np.float32(value)))


@pytest.mark.parametrize("name,bits,offset,factor", [("three bit scale pairs", 6, 32, -12),
                                                     ("two bit scale pairs", 4, 0, -128)])
def test_integer_tiles_scale_pairs_every_scale_in_every_position(name, bits, offset, factor):
    """Q3_K's 6-bit and Q2_K's 4-bit sub-block scales, byte k of a word -> the bf16 pairs s = scale - offset and
    factor * s."""
    constant = LOOKUP_WORDS[BF16_INT_WORDS_AT + 1]
    for scale in range(1 << bits):
        for k in range(4):
            word = pack([(scale if i == k else 37 * i + 11) & ((1 << bits) - 1) for i in range(4)])
            out = run_ptx(PTX_SOURCES[name], {"$2": word, "$3": 0x4040 + 0x101 * k, "$4": constant})
            s, product = bf16_bits_of_int(scale - offset), bf16_bits_of_int(factor * (scale - offset))
            assert (out["$0"], out["$1"]) == (s | (s << 16), product | (product << 16))


@pytest.mark.parametrize("seed", range(2))
def test_two_bit_ints(seed):
    """Q2_K's codes of 16 elements and their sub-block's scale pairs -> f code scale as bf16, exact, position
    4i + 2c + h holding element 4 (c + 2h) + i and f = 1, 4, 16, 16 for i = 0-3: every scale, every code in every
    position, random words."""
    rng = np.random.default_rng(seed)
    words = {"$19": LOOKUP_WORDS[BF16_INT_WORDS_AT + 2]}
    for scale in range(16):
        s, product = bf16_bits_of_int(scale), bf16_bits_of_int(-128 * scale)
        words |= {"$17": s | (s << 16), "$18": product | (product << 16)}
        for codes in (np.roll(np.arange(16) % 4, scale), rng.integers(0, 4, 16)):
            out = run_ptx(PTX_SOURCES["two bit ints"], {"$16": sum(int(c) << (2 * e) for e, c in enumerate(codes)),
                                                       **words})
            elements = [4 * ((p // 2) % 2 + 2 * (p % 2)) + p // 4 for p in range(16)]
            expected = [bf16_bits_of_int(int(codes[e]) * 4 ** min(e % 4, 2) * scale) for e in elements]
            assert [out[f"${p}"] for p in range(16)] == expected, scale


@pytest.mark.parametrize("seed", range(2))
def test_three_bit_ints(seed):
    """Q3_K's codes of 32 elements, two sub-blocks, and their scale pairs -> (code - 4) * (scale - 32) as bf16,
    exact, position 16h + 4i + j holding element 4j + i of sub-block h: every scale, every code in every position,
    random words."""
    rng = np.random.default_rng(seed)
    words = {"$38": LOOKUP_WORDS[BF16_INT_WORDS_AT]}
    for scale in range(64):
        scales = (scale, 63 - scale)
        low, third, expected = 0, [0, 0], []
        for h, sub_scale in enumerate(scales):
            s, offset = bf16_bits_of_int(sub_scale - 32), bf16_bits_of_int(-12 * (sub_scale - 32))
            words |= {f"${34 + 2 * h}": s | (s << 16), f"${35 + 2 * h}": offset | (offset << 16)}
            codes = np.roll(np.arange(16) % 8, scale + h) if scale < 8 else rng.integers(0, 8, 16)
            low |= sum(int(c & 3) << (2 * e) for e, c in enumerate(codes)) << (32 * h)
            third[h] = sum(int(c >> 2) << e for e, c in enumerate(codes))
            expected += [bf16_bits_of_int((int(codes[4 * (p % 4) + p // 4]) - 4) * (sub_scale - 32)) for p in range(16)]
        out = run_ptx(PTX_SOURCES["three bit ints"], {"$32": low, "$33": spread_third_bits(*third), **words})
        assert [out[f"${p}"] for p in range(32)] == expected, scale


def test_bf16x2_fma_model_rounds_each_half_once():
    # 1 + 2^-7 times itself is 1 + 2^-6 + 2^-14, nearer 1 + 2^-6 (0x3F82) than the next bf16; minus 2^-14 (the
    # high half) it is 1 + 2^-6 exactly
    one_and_a_bit = 0x3F81
    minus_tiny = bf16_bits(bits_of(np.float32(-(2.0**-14))))
    assert bf16x2_fma(one_and_a_bit | (one_and_a_bit << 16), one_and_a_bit | (one_and_a_bit << 16),
                      minus_tiny << 16) == 0x3F82 | (0x3F82 << 16)


def test_f16x2_model_rounds_each_half():
    one_and_a_bit = 1 + 2.0**-10  # times itself: 1 + 2^-9 + 2^-20, above the tie, rounds up to 1 + 2^-9
    bits = int(np.float16(one_and_a_bit).view(np.uint16))
    assert f16x2(np.multiply)(bits | (0x3C00 << 16), bits | (0x4000 << 16)) == 0x3C02 | (0x4000 << 16)


def test_cvt_model_rounds_to_nearest_even():
    # 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: to the even one, 1; 1 + 3 * 2^-8 rounds up
    assert bf16_bits(bits_of(np.float32(1 + 2**-8))) == 0x3F80
    assert bf16_bits(bits_of(np.float32(1 + 3 * 2**-8))) == 0x3F82


def test_prmt_model_matches_the_ptx_manual_example():
    # the byte-permute example of CUB's PRMT documentation: {b, a} = 0x07060504_03020100, selector 0x7531
    assert prmt(0x03020100, 0x07060504, 0x7531) == 0x07050301
    assert prmt(0x00000080, 0, 0x4448) == 0x000000FF  # bit 3: the selected byte's sign, replicated
