"""Codes -> float32 bit patterns by the mantissa trick, a 32-bit word of codes at a time, with PRMT byte permutes.

A code byte `v` placed in the low bits of 2^23's bit pattern (0x4B000000) is the float 2^23 + v; one float
subtraction then gives the value exactly (`decode_planes._bits_to_float`). A code below 128 can instead be placed at
bit 16 of 128's bit pattern (0x43000000, the "128 form"): the float 128 + v, exact in bf16 too, whose product with a
bf16 or fp16 activation is exact in float32. A byte of any value (Q8_0's int8 codes + 128, IQ4's levels + 128)
takes the 128 form at bit 8: 128 + b / 256, 16 significant bits, its product with a bf16 activation still exact;
one multiply-add then decodes it exactly (`decode_planes.code_step`). The M = 1 kernel sums the products of codes
below 128 and takes 128 and the code's offset out once per sub-block instead of subtracting them from every element
(`qmatmul._gemv_sub_block_sums`); the tensor-core kernels decode v * scale + offset as one multiply-add of the 128
form and per-block constants. The
planes decoders hand their codes over a 32-bit word per asm call (4, 8 or 16 codes; the mma.sync GPUs' split-K
kernel gives 4-bit codes in the 128 form four bytes a register instead: `nibble_float_bits`); here, on NVIDIA GPUs,
one `prmt` per code moves a byte into that pattern (and, for 4-bit codes, `prmt`s look 4 codes up in a 16-entry byte
table held in four registers), where Triton's own code would extract every byte, mask it, shift it and OR it in
(sm_90: IQ4_NL's GEMM counted 16.5 instructions a decoded element with three selects per code, then 7.7). 3-, 5- and
6-bit codes come as a 32-bit word of low bits with their high bits, 16 or 8 elements an asm call, the high bits
merged before the conversion. The byte tables reach the asm as operands loaded from the kernels' lookup table
(`LOOKUP_WORDS`). NF4 and IQ4 bound for bf16 look each weight up whole in its block's 16 possible weights
(`code_book_bf16`); NF4's split-K kernel looks its f16 levels up in fixed tables instead (`nf4_half_levels`).

Each function has a portable twin in plain Triton, taken under Triton's interpreter (which runs no assembly) and on
GPUs that are not NVIDIA's. `PTX_SOURCES` holds the assembly as text: tests/test_float_bits.py runs it through a
small model of the PTX instructions it uses, against the definitions, since no GPU is needed to read it.
"""

import re

import numpy as np
import triton
import triton.language as tl
import torch

from kernels.formats import IQ4_VALUES, NF4_VALUES

# inline PTX only where Triton compiles for an NVIDIA GPU (the interpreter and ROCm take the portable twins)
PTX = tl.constexpr(not triton.knobs.runtime.interpret and torch.version.hip is None)
FLOAT_OF_TWO_POW_23 = tl.constexpr(0x4B000000)  # 2^23's float32 bits: OR a value < 2^23 in, it lands in the mantissa
FLOAT_OF_128 = tl.constexpr(0x43000000)  # 128's: OR v << 16 in (v < 128), it is 128 + v; v << 8, 128 + v / 256


_CONSTANT_SHIFT = re.compile(r"^(shr|shl)\.b32 (\S+), (\S+), (\d+);$")


def _shift_as_multiply(line: str) -> str:
    """A shift by a constant k as a multiply: shl as mul.lo by 2^k, shr (logical) as mul.hi by 2^(32 - k). ptxas
    keeps them as IMAD, which runs on the FMA pipe, where shifts take the integer pipe with the permutes, masks and
    float packing; that pipe has 16 lanes, one warp instruction every other clock, and is the busiest one in most
    decoding loops (`bench.sass.scheduler_clocks`)."""
    match = _CONSTANT_SHIFT.match(line)
    if match is None:
        return line
    op, dst, src, k = match[1], match[2], match[3], int(match[4])
    return f"mul.lo.u32 {dst}, {src}, {1 << k};" if op == "shl" else f"mul.hi.u32 {dst}, {src}, {1 << (32 - k)};"


def _assemble(lines: list[str]) -> str:
    """One PTX block, its scratch registers (every name written that is not an operand $n, `{a, b}` vectors
    included) declared, shifts by constants as multiplies (`_shift_as_multiply`)."""
    lines = [_shift_as_multiply(line) for line in lines]
    written = (line.split(" ", 1)[1].split("}" if line.split()[1].startswith("{") else ",")[0] for line in lines)
    names = dict.fromkeys(name.strip(" {") for dest in written for name in dest.split(","))
    scratch = ", ".join(name for name in names if not name.startswith("$"))
    return "{\n.reg .b32 " + scratch + ";\n" + "\n".join(lines) + "\n}"


def _float_bits_of_bytes(sources: list[tuple[str, int]], biased: bool = False, full_bytes: bool = False) -> list[str]:
    """Output $i: the bits of 2^23 + byte `byte` of register `source` (the i-th pair): that byte, two zero bytes
    and 0x4B from the constant 0x4B000000; or with `biased` in the 128 form, 128 + byte (bytes below 128): two zero
    bytes, that byte and 0x43, or with `full_bytes` (bytes of any value) 128 + byte / 256: a zero byte, that byte,
    a zero byte and 0x43."""
    if biased:
        pick = "0x76{}4" if full_bytes else "0x7{}44"
        return [f"prmt.b32 ${i}, {source}, 0x43000000, {pick.format(byte)};" for i, (source, byte) in enumerate(sources)]
    return [f"prmt.b32 ${i}, {source}, 0x4B000000, 0x744{byte};" for i, (source, byte) in enumerate(sources)]


def _int8_bits_ptx(biased: bool = False) -> str:
    """A word of 4 int8 codes ($4) -> the bits of 2^23 + code + 128 for each ($0-$3), or with `biased` of
    128 + (code + 128) / 256: flipping the sign bit makes two's complement offset binary."""
    return _assemble(["xor.b32 b, $4, 0x80808080;"] + _float_bits_of_bytes([("b", i) for i in range(4)], biased,
                                                                           full_bytes=True))


def _lookups(tables: list[list[str]], half_bits: str, codes: str = "$8", name: str = "") -> list[str]:
    """PTX: for the 8 4-bit codes of register `codes` (element order, low nibble first), byte `table[code]` of each
    16-entry byte table (four registers, four entries a word) into register `name`vak (elements 0-3, a byte each)
    and `name`vbk (elements 4-7), k the table's index.

    prmt picks byte (selector & 7) of 8, here one half of the table in two registers: the codes' low 3 bits pick
    from both halves, a second prmt picks the half by the code's bit 3. Selector bit 3 would sign-replicate the
    byte, hence the mask 0x77777777. The second selectors take two constants; the mask 0x44444444 comes as the
    operand `half_bits` (`LOOKUP_WORDS`), since as a constant ptxas put it into a register again for every call
    (sm_90 FMA GEMV, IQ4_NL: 0.13 instructions an element)."""
    lines = [f"and.b32 {name}qa, {codes}, 0x77777777;",  # selectors of elements 0-3 in the low 16 bits
             f"shr.b32 {name}qb, {name}qa, 16;",  # of elements 4-7
             f"shr.b32 {name}sa, {codes}, 1;",  # second selectors: byte i of the first half's result, or the second's
             f"and.b32 {name}sa, {name}sa, {half_bits};",
             f"or.b32 {name}sa, {name}sa, 0x32103210;",
             f"shr.b32 {name}sb, {name}sa, 16;"]
    for k, t in enumerate(tables):
        for half in "ab":
            lines += [f"prmt.b32 lo, {t[0]}, {t[1]}, {name}q{half};", f"prmt.b32 hi, {t[2]}, {t[3]}, {name}q{half};",
                      f"prmt.b32 {name}v{half}{k}, lo, hi, {name}s{half};"]
    return lines


def _table_operands(first: int, tables: int) -> list[list[str]]:
    """The operands holding `tables` byte tables of 4 words each, from $`first` on."""
    return [[f"${first + 4 * k + i}" for i in range(4)] for k in range(tables)]


def byte_table_words(table) -> list[int]:
    """A 16-entry byte table as the four little-endian 32-bit words `_lookups` takes."""
    return [int.from_bytes(bytes(table[i:i + 4]), "little") for i in range(0, 16, 4)]


# element 2j is byte j's low nibble, 2j + 1 its high one: which (register, byte) holds each of the 8 elements
_LOW_ELEMENTS = [("a", 0), ("a", 2), ("b", 0), ("b", 2)]
_HIGH_ELEMENTS = [("a", 1), ("a", 3), ("b", 1), ("b", 3)]


def _nibble_bits_ptx(table: bool, biased: bool = False) -> str:
    """A word ($8) of 8 4-bit codes (element e at bits 4e) -> the bits of 2^23 + v (`biased`: 128 + v) for the low
    nibbles ($0-$3: elements 0, 2, 4, 6) and the high ones ($4-$7: 1, 3, 5, 7): v the code itself, or with `table`
    byte `code` of the table in the words $9-$12 (`biased`: 128 + v / 256, a byte of any value; `_lookups`'
    half_bits in $13)."""
    if not table:
        lines = ["and.b32 va0, $8, 0x0f0f0f0f;", "shr.b32 vb0, $8, 4;", "and.b32 vb0, vb0, 0x0f0f0f0f;"]
        elements = [("va0", i) for i in range(4)] + [("vb0", i) for i in range(4)]
    else:
        lines = _lookups(_table_operands(9, 1), "$13")
        elements = [(f"v{part}0", byte) for part, byte in _LOW_ELEMENTS + _HIGH_ELEMENTS]
    return _assemble(lines + _float_bits_of_bytes(elements, biased, full_bytes=table))


def _nibble_int8_ptx() -> str:
    """A word ($2) of 8 4-bit codes -> byte `code` of the table in the words $3-$6 (`_lookups`' half_bits in $7),
    elements 0-3 in the bytes of $0, 4-7 in those of $1: IQ4's levels as int8, for `int_gemv`'s dot products."""
    return _assemble(_lookups(_table_operands(3, 1), "$7", codes="$2") + ["mov.b32 $0, va0;", "mov.b32 $1, vb0;"])


def _nibble_float32_ptx() -> str:
    """A word ($8) of 8 4-bit codes -> the float32 value[code], low nibbles ($0-$3), high ones ($4-$7), from four
    byte tables in the words $9-$24 (byte k of each value: `float32_byte_tables`; `_lookups`' half_bits in $25),
    then a 4 x 4 byte transpose per 4 elements."""
    lines = _lookups(_table_operands(9, 4), "$25")
    out = 0
    for name, elements in (("low", _LOW_ELEMENTS), ("high", _HIGH_ELEMENTS)):
        for half in "ab":
            first, second = [byte for h, byte in elements if h == half]
            # bytes 0-1 (x01) and 2-3 (x23) of the two elements: (first's, second's), then one prmt each
            pick = f"0x{second + 4}{second}{first + 4}{first}"
            lines += [f"prmt.b32 {name}{half}01, v{half}0, v{half}1, {pick};",
                      f"prmt.b32 {name}{half}23, v{half}2, v{half}3, {pick};",
                      f"prmt.b32 ${out}, {name}{half}01, {name}{half}23, 0x5410;",
                      f"prmt.b32 ${out + 1}, {name}{half}01, {name}{half}23, 0x7632;"]
            out += 2
    return _assemble(lines)


def _float32_immediate(value) -> str:
    return f"0f{int(np.asarray(value, dtype='<f4').view('<u4')):08X}"


def _code_book_bf16_ptx(values) -> str:
    """16 4-bit codes ($16, 64 bits, element e at bits 4e..4e + 3) of one block, its scale ($17; `_lookups`'
    half_bits in $18) -> the bf16 weights
    value[code] * scale ($0-$15), for the code book `values` (NF4's, IQ4's). First the block's 16 possible weights:
    value[c] * scale in float32, rounded to bf16 (the same two roundings as decoding to float32, then converting),
    as two 16-entry byte tables, their low bytes (l0-l3, four entries a word) and their high bytes (h0-h3); then
    each code looks up both bytes. cvt to bf16x2 needs sm_80, as bf16 tensor-core operands do. ptxas computes the
    table once for the calls of a thread that share a block (the same scale register)."""
    # NF4's zero is +0 whatever the scale: its scale, an absolute maximum, is never negative (IQ4 has no zero)
    lines = [f"mul.f32 p{c}, $17, {_float32_immediate(value)};" if value else f"mov.b32 p{c}, 0;"
             for c, value in enumerate(values)]
    lines += [f"cvt.rn.bf16x2.f32 w{j}, p{2 * j + 1}, p{2 * j};" for j in range(8)]  # p_2j in the low half
    lines += [f"prmt.b32 l{i}, w{2 * i}, w{2 * i + 1}, 0x6420;" for i in range(4)]
    lines += [f"prmt.b32 h{i}, w{2 * i}, w{2 * i + 1}, 0x7531;" for i in range(4)]
    lines.append("mov.b64 {c0, c1}, $16;")
    for half in range(2):
        name = f"c{half}"
        lines += _lookups([[f"l{i}" for i in range(4)], [f"h{i}" for i in range(4)]], "$18", name, name)
        pairs = [("a", "0x5140"), ("a", "0x7362"), ("b", "0x5140"), ("b", "0x7362")]  # elements 01, 23, 45, 67
        for j, (part, pick) in enumerate(pairs):
            e = 8 * half + 2 * j
            lines += [f"prmt.b32 e, {name}v{part}0, {name}v{part}1, {pick};", f"mov.b32 {{${e}, ${e + 1}}}, e;"]
    return _assemble(lines)


def _iq4_half_ptx() -> str:
    """A word ($8) of 8 IQ4 codes, the f16 scale of their block in both halves of $9 -> the f16 weights
    kvalues_iq4nl[code] * scale ($0-$7). Each code looks its level + 128 up as a byte (the table in $10-$13,
    `_lookups`' half_bits in $14), a permute sets 0x64 above it, the f16 1024 + level + 128 (0x6464 pairs in $15),
    a subtraction of 1152 (pairs in $16) leaves the level exactly, a multiply rounds level * scale once: one table
    where the bf16 weights take two (`_code_book_bf16_ptx`), and no per-block table to build."""
    lines = _lookups(_table_operands(10, 1), "$14")
    for k, (part, pick) in enumerate([("a", "0x4140"), ("a", "0x4342"), ("b", "0x4140"), ("b", "0x4342")]):
        lines += [f"prmt.b32 e, v{part}0, $15, {pick};", "sub.f16x2 e, e, $16;", "mul.f16x2 e, e, $9;",
                  f"mov.b32 {{${2 * k}, ${2 * k + 1}}}, e;"]
    return _assemble(lines)


def _three_bit_ints_ptx() -> str:
    """Q3_K's codes of 32 elements, two sub-blocks ($32: their low 2 bits as two words, element e at bits 2e of the
    first or of the second; $33: their third bits, spread a nibble to a byte, the second 16's shifted down 4:
    `_third_bits_in_element_order`), the sub-blocks' s = scale - 32 as bf16 pairs ($34: s, $35: -12 s for the
    first, $36, $37 for the second; 0x41414141 in $38) -> the bf16 (code - 4) * s, exact integers of at most 128 in
    magnitude, each 16 in 4 x 4 transposed order: $(16h + 4i + j) is element 4j + i of 16 h, field i of byte j. A
    code goes to bits 4-6 under the byte 0x41: the bf16 8 + code, in the binade where a mantissa step is 1/16 of 16
    units, and one multiply-add (8 + code) * s - 12 s gives (code - 4) * s rounded once, exactly; 12 s is exact
    too, where the 128 form's 132 s would not be. Field i's pairs of bytes (j, j + 1) become one register each."""
    lines = ["mov.b64 {la, lb}, $32;", "shr.b32 hb, $33, 4;"]
    for half, (low, third, s, offset) in enumerate((("la", "$33", "$34", "$35"), ("lb", "hb", "$36", "$37"))):
        for i in range(4):
            shift = 4 - 2 * i  # field i (bits 2i, 2i + 1 of each byte) to bits 4-5
            field = low
            if shift:
                lines.append(f"{'shl' if shift > 0 else 'shr'}.b32 x, {low}, {abs(shift)};")
                field = "x"
            lines += [f"and.b32 v, {field}, 0x30303030;", f"shl.b32 y, {third}, {6 - i};",
                      "and.b32 y, y, 0x40404040;", "or.b32 v, v, y;"]
            for j in (0, 2):
                out = 16 * half + 4 * i + j
                lines += [f"prmt.b32 p, v, $38, 0x4{j + 1}4{j};", f"fma.rn.bf16x2 p, p, {s}, {offset};",
                          f"mov.b32 {{${out}, ${out + 1}}}, p;"]
    return _assemble(lines)


def _two_bit_ints_ptx() -> str:
    """Q2_K's codes of 16 elements ($16, element e at bits 2e) and their sub-block's scale as bf16 pairs ($17: sc,
    $18: -128 sc; 0x43004300 in $19) -> the bf16 f code sc, exact, in `in_two_bit_order` (f: `two_bit_factors`).
    Fields 0-2 of bytes 0 and 2 are mantissa bits 0-5 of a bf16 pair: one mask and 0x43 (the exponent of 128) above
    them make the pair 128 + f code (f = 1, 4, 16), and that times sc less 128 sc is f code sc, exactly (at most
    16 * 45); field 3 is shifted to bits 4-5 first, bytes 1 and 3 down by 8."""
    lines = [f"shr.b32 x{shift}, $16, {shift};" for shift in (2, 8, 10)]
    for p, (source, field) in enumerate((("$16", 0), ("x8", 0), ("$16", 1), ("x8", 1), ("$16", 2), ("x8", 2),
                                         ("x2", 2), ("x10", 2))):
        lines += [f"and.b32 v, {source}, {0x00030003 << (2 * field)};", "or.b32 v, v, $19;",
                  "fma.rn.bf16x2 v, v, $17, $18;", f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, v;"]
    return _assemble(lines)


# NF4's levels as the split-K kernel's f16 operands (`nf4_half_levels`): f16(NF4_LEVEL_SCALE * value), zero as -0
# (0x8000), the block's absmax / NF4_LEVEL_SCALE applied to the sums. NF4_LEVEL_SCALE is the float32 in [1, 2), on a
# grid of 2^-20, whose levels' bytes take `sum_tables` (every low byte and every high byte of levels k and k + 8
# straddle 128) with the least relative error: 0.502 2^-11 (f16 rounds any value to within 2^-11 of it).
NF4_LEVEL_SCALE = float(np.float32(1.7199488))


def nf4_half_level_bits() -> list[int]:
    """The 16 f16 bit patterns of NF4's scaled levels (`NF4_LEVEL_SCALE`), the zero as -0: the codes below 8 (the
    negative levels and the zero) then have the sign bit set, those from 8 on (the positive ones) not."""
    scaled = (np.float32(NF4_LEVEL_SCALE) * np.asarray(NF4_VALUES, dtype=np.float32)).astype(np.float16)
    return [0x8000 if level == 0 else int(bits) for level, bits in zip(NF4_VALUES, scaled.view(np.uint16))]


def sum_tables(table) -> tuple[list[int], list[int]]:
    """A 16-entry byte table whose entries k and k + 8 straddle 128 (one below it, the other from 128 to 254) -> the
    8-entry tables a and b for which, for every code c, prmt's pick from a with selector c plus its pick from b with
    selector c ^ 8 is table[c] + 128. Selector bit 3 makes prmt replicate the picked byte's top bit (0x00 or 0xFF):
    a code below 8 picks a[c] and b[c]'s sign, one from 8 on a[c - 8]'s sign and b[c - 8]; so the entry below 128
    goes to its table + 128 (top bit set), the other to its table - 127 (from 1 to 127). Four bytes at a time, as
    32-bit words, a + b - 0x80808080 is then the four entries, carries between the bytes' sums included: no select
    between the halves."""
    a, b = [], []
    for low, high in zip(table[:8], table[8:]):
        if low < 128 <= high <= 254:
            a.append(low + 128)
            b.append(high - 127)
        elif high < 128 <= low <= 254:
            a.append(low - 127)
            b.append(high + 128)
        else:
            raise ValueError(f"entries {low} and {high} do not straddle 128")
    return a, b


def _nf4_half_levels_ptx() -> str:
    """8 NF4 codes ($8, element e at bits 4e) -> their f16 levels (`nf4_half_level_bits`, $0-$7). Each byte of the
    levels is two prmt lookups and a sum (`sum_tables`: $9-$12 the low bytes' a and b, $13-$16 the high bytes', two
    words each; -0x80808080 in $17), then a permute pairs each element's low and high bytes. Where the bf16 weights
    (`_code_book_bf16_ptx`) take a select between the table's halves, its selectors, and a table built per block.
    The first of the four sums is two adds (one IADD3, on the integer pipe with the permutes), the others two
    multiply-adds by 1 ($18, an operand: by a constant 1 ptxas made them adds), which ptxas keeps as IMAD on the FMA
    pipe: that balances the integer pipe against issue (sm_90 split-K: 3.73 clocks an element, against 4.47 with
    every sum an IADD3 and 3.84 with none)."""
    lines = ["xor.b32 f, $8, 0x88888888;", "shr.b32 ch, $8, 16;", "shr.b32 fh, f, 16;"]
    for half, (codes, flipped) in enumerate((("$8", "f"), ("ch", "fh"))):
        for byte, table in (("l", 9), ("h", 13)):
            lines += [f"prmt.b32 a, ${table}, ${table + 1}, {codes};",
                      f"prmt.b32 b, ${table + 2}, ${table + 3}, {flipped};"]
            if half == 0 and byte == "l":
                lines += [f"add.u32 {byte}, a, b;", f"add.u32 {byte}, {byte}, $17;"]
            else:
                lines += [f"mad.lo.u32 {byte}, a, $18, b;", f"mad.lo.u32 {byte}, {byte}, $18, $17;"]
        for j, pick in enumerate(("0x5140", "0x7362")):
            e = 4 * half + 2 * j
            lines += [f"prmt.b32 e, l, h, {pick};", f"mov.b32 {{${e}, ${e + 1}}}, e;"]
    return _assemble(lines)


def _nf4_half_level_words() -> list[int]:
    """`_nf4_half_levels_ptx`' tables ($9-$16), -0x80808080 ($17) and 1 ($18)."""
    bits = nf4_half_level_bits()
    words = []
    for byte in (0, 1):
        for part in sum_tables([(b >> (8 * byte)) & 0xFF for b in bits]):
            words += byte_table_words(part + [0] * 8)[:2]
    return words + [(-0x80808080) & 0xFFFFFFFF, 1]


def _bf16x2_immediate(value: int) -> str:
    bits = int(np.asarray(value, dtype="<f4").view("<u4")) >> 16
    assert bits << 16 == int(np.asarray(value, dtype="<f4").view("<u4")), "exact in bf16"
    return f"0x{bits:04X}{bits:04X}"


def _scale_pairs_ptx(offset: int, factor: int) -> str:
    """Byte $3 & 3 of $2, a sub-block scale below 128 (the selector 0x4040 + 0x101 ($3 & 3) is $3), and 0x43434343
    ($4) -> bf16 pairs of s = scale - `offset` ($0) and `factor` s ($1), from the bf16 128 + scale, each one exact
    multiply-add: the integer tiles' scales (`_three_bit_ints_ptx`: offset 32, factor -12; `_two_bit_ints_ptx`: 0,
    -128)."""
    return _assemble(["prmt.b32 p, $2, $4, $3;", "mov.b32 a, 0x3F803F80;",
                      f"mov.b32 b, {_bf16x2_immediate(-128 - offset)};", "fma.rn.bf16x2 $0, p, a, b;",
                      f"mov.b32 c, {_bf16x2_immediate(factor)};",
                      f"mov.b32 e, {_bf16x2_immediate(-factor * (128 + offset))};", "fma.rn.bf16x2 $1, p, c, e;"])


def _two_bit_fields_ptx(third: bool, biased: bool = False) -> str:
    """Codes of 16 elements, their low 2 bits from $16 (element e at bits 2e..2e+1) and with `third` (Q3_K) a third
    bit from $17 (spread a nibble to a byte: `_third_bits_in_element_order`) -> the bits of 2^23 (`biased`: 128) +
    code for elements 0-15 ($0-$15); Q2_K's codes are the 2-bit fields alone. Elements i, 4 + i, 8 + i, 12 + i are
    fields i of $16's four bytes: one shift and mask gives their low bits, a byte each, and one more their third
    bits' (bit i of each byte) at bit 2."""
    lines = []
    for i in range(4):
        low = f"$16" if i == 0 else "x"
        if i:
            lines.append(f"shr.b32 x, $16, {2 * i};")
        lines.append(f"and.b32 v{i}, {low}, 0x03030303;")
        if third:
            if i < 2:
                lines.append(f"shl.b32 y, $17, {2 - i};")
            elif i > 2:
                lines.append(f"shr.b32 y, $17, {i - 2};")
            lines += [f"and.b32 y, {'$17' if i == 2 else 'y'}, 0x04040404;", f"or.b32 v{i}, v{i}, y;"]
    sources = [(f"v{e % 4}", e // 4) for e in range(16)]
    return _assemble(lines + _float_bits_of_bytes(sources, biased))


def _five_bit_ptx(biased: bool = False) -> str:
    """5-bit codes of 8 elements, the low 4 bits from $8 (element e at bits 4e..4e+3) and the fifth from $9 (bit e)
    -> the bits of 2^23 + code (`biased`: 128 + code) for elements 0-7 ($0-$7). The even elements' fifth bits (0,
    2, 4, 6) reach bit 4 of bytes 0-3 by one multiply: shifts of 4, 10, 16 and 22 (0x00410410); the other products
    collide only at bits 10, 16 and 22, and their carries stop at bits 11, 17 and 23, so the mask 0x10101010 keeps
    just the four. The odd elements' (1, 3, 5, 7) take shifts one less (0x00208208), the same pattern a bit up."""
    lines = ["and.b32 va, $8, 0x0f0f0f0f;",  # elements 0, 2, 4, 6, a byte each
             "shr.b32 vb, $8, 4;",
             "and.b32 vb, vb, 0x0f0f0f0f;",  # elements 1, 3, 5, 7
             "and.b32 f, $9, 0x55;",
             "mul.lo.u32 f, f, 0x00410410;",
             "and.b32 f, f, 0x10101010;",
             "or.b32 va, va, f;",
             "and.b32 f, $9, 0xaa;",
             "mul.lo.u32 f, f, 0x00208208;",
             "and.b32 f, f, 0x10101010;",
             "or.b32 vb, vb, f;"]
    return _assemble(lines + _float_bits_of_bytes([("vb" if e % 2 else "va", e // 2) for e in range(8)], biased))


def _six_bit_ptx(biased: bool = False) -> str:
    """Q6_K's codes of 8 elements, the low 4 bits from $8 (element e at bits 4e..4e+3) and the top 2 from $9 (bits
    2e..2e+1) -> the bits of 2^23 + code (`biased`: 128 + code) for elements 0-7 ($0-$7). One permute copies byte
    0 of the top bits into bytes 0-1 and byte 1 into bytes 2-3, so that element 2j's top bits sit at bits 0-1 (j
    even) or 4-5 (j odd) of byte j, element 2j + 1's at bits 2-3 or 6-7; shifts bring each to bits 4-5 of its byte,
    next to the low 4 bits. Triton's own code took about 2.6 instructions an element for the top bits, this 1."""
    lines = ["prmt.b32 x, $9, 0, 0x1100;",
             "and.b32 va, $8, 0x0f0f0f0f;",  # elements 0, 2, 4, 6, a byte each
             "shl.b32 t, x, 4;",
             "and.b32 t, t, 0x00300030;",
             "and.b32 u, x, 0x30003000;",
             "or.b32 va, va, t;",
             "or.b32 va, va, u;",
             "shr.b32 vb, $8, 4;",
             "and.b32 vb, vb, 0x0f0f0f0f;",  # elements 1, 3, 5, 7
             "shl.b32 t, x, 2;",
             "and.b32 t, t, 0x00300030;",
             "shr.b32 u, x, 2;",
             "and.b32 u, u, 0x30003000;",
             "or.b32 vb, vb, t;",
             "or.b32 vb, vb, u;"]
    return _assemble(lines + _float_bits_of_bytes([("vb" if e % 2 else "va", e // 2) for e in range(8)], biased))


def float32_byte_tables(values) -> list[tuple[int, ...]]:
    """16 float32 values as four 16-entry byte tables, byte k of each value in table k."""
    bits = [int(b) for b in np.asarray(values, dtype="<f4").view("<u4")]
    return [tuple((b >> (8 * k)) & 0xFF for b in bits) for k in range(4)]


IQ4_OFFSET_BINARY = tuple(v + 128 for v in IQ4_VALUES)  # kvalues_iq4nl as bytes: value + 128
# The lookup table the kernels take (`tables_ptr`, 32-bit words): NF4's 16 float32 values (the portable twins and
# the blocks decoder gather them), then the byte tables of the PRMT lookups, passed to the asm as operands: loaded
# once, they stay in registers, where constants in the asm were rematerialised for every call (NF4's 16 words:
# about 2 instructions an element); then IQ4's values as float32 (`code_book_bf16`'s portable twin gathers them);
# then `_lookups`' half_bits, an operand for the same reason; then IQ4's values as int8 bytes; then constants of the
# integer tiles.
NF4_WORDS_AT = tl.constexpr(16)
IQ4_WORDS_AT = tl.constexpr(32)
IQ4_VALUES_AT = tl.constexpr(36)
HALF_BITS_AT = tl.constexpr(52)
IQ4_INT8_WORDS_AT = tl.constexpr(53)
HALF_WORDS_AT = tl.constexpr(57)
BF16_INT_WORDS_AT = tl.constexpr(59)
Q3_K_SCALE_SHIFTS_AT = tl.constexpr(62)
# Q3_K's 6-bit scales (`decode_planes.q3_k_int_tile`): in its super-block's half h, sub-block j's low 4 bits are
# nibble h of byte j, its top 2 bits 4 h + 2 (j // 4) up in byte 8 + j % 4: the shifts 4 h, then per h and per
# quarter q of the tile (j = 2 q, 2 q + 1) 4 h + 2 (q // 2)
Q3_K_SCALE_SHIFTS = (0, 4) + tuple(4 * h + 2 * (q // 2) for h in range(2) for q in range(4))
# then NF4's scaled f16 levels (`nf4_half_levels`): the levels as float32 for the portable twin, then the asm's
# byte tables, -0x80808080 and 1, 10 words, 4 times over (`_words_by_quarter`)
NF4_HALF_VALUES_AT = tl.constexpr(72)
NF4_HALF_WORDS_AT = tl.constexpr(88)
NF4_HALF_WORDS = tl.constexpr(10)
LOOKUP_WORDS = tuple([int(b) for b in np.asarray(NF4_VALUES, dtype="<f4").view("<u4")]
                     + [w for table in float32_byte_tables(NF4_VALUES) for w in byte_table_words(table)]
                     + byte_table_words(IQ4_OFFSET_BINARY)
                     + [int(b) for b in np.asarray(IQ4_VALUES, dtype="<f4").view("<u4")]
                     + [0x44444444]
                     + byte_table_words([v & 0xFF for v in IQ4_VALUES])
                     + [0x64646464, 0x64806480]
                     + [0x41414141, 0x43434343, 0x43004300]
                     + list(Q3_K_SCALE_SHIFTS)
                     + [int(b) for b in np.asarray(nf4_half_level_bits(), dtype=np.uint16).view(np.float16)
                        .astype("<f4").view("<u4")]
                     + _nf4_half_level_words() * 4)
PTX_SOURCES = {"int8": _int8_bits_ptx(), "int8 128": _int8_bits_ptx(biased=True), "nibble": _nibble_bits_ptx(False),
               "nibble iq4": _nibble_bits_ptx(True), "nibble iq4 128": _nibble_bits_ptx(True, biased=True),
               "nibble nf4": _nibble_float32_ptx(), "nibble iq4 int8": _nibble_int8_ptx(),
               "three bit": _two_bit_fields_ptx(True), "two bit": _two_bit_fields_ptx(False), "five bit": _five_bit_ptx(),
               "nf4 bf16": _code_book_bf16_ptx(NF4_VALUES), "iq4 bf16": _code_book_bf16_ptx(IQ4_VALUES),
               "iq4 f16": _iq4_half_ptx(), "three bit ints": _three_bit_ints_ptx(),
               "three bit scale pairs": _scale_pairs_ptx(32, -12), "two bit ints": _two_bit_ints_ptx(),
               "two bit scale pairs": _scale_pairs_ptx(0, -128), "nf4 half": _nf4_half_levels_ptx(),
               "nibble 128": _nibble_bits_ptx(False, biased=True),
               "three bit 128": _two_bit_fields_ptx(True, biased=True),
               "two bit 128": _two_bit_fields_ptx(False, biased=True), "five bit 128": _five_bit_ptx(biased=True),
               "six bit": _six_bit_ptx(), "six bit 128": _six_bit_ptx(biased=True),
               # byte index of $1 -> the bits of 2^23 + that byte, the selector 0x754<index> an operand ($2)
               "byte": "prmt.b32 $0, $1, 0x4B000000, $2;"}
BYTE_SELECTOR = tl.constexpr(0x7540)  # bytes index, 0, 0 and 0x4B of {0x4B000000, word}
INT8_PTX = tl.constexpr(PTX_SOURCES["int8"])
INT8_128_PTX = tl.constexpr(PTX_SOURCES["int8 128"])
NIBBLE_PTX = tl.constexpr(PTX_SOURCES["nibble"])
NIBBLE_IQ4_PTX = tl.constexpr(PTX_SOURCES["nibble iq4"])
NIBBLE_IQ4_128_PTX = tl.constexpr(PTX_SOURCES["nibble iq4 128"])
NIBBLE_NF4_PTX = tl.constexpr(PTX_SOURCES["nibble nf4"])
NIBBLE_IQ4_INT8_PTX = tl.constexpr(PTX_SOURCES["nibble iq4 int8"])
THREE_BIT_PTX = tl.constexpr(PTX_SOURCES["three bit"])
FIVE_BIT_PTX = tl.constexpr(PTX_SOURCES["five bit"])
NF4_BF16_PTX = tl.constexpr(PTX_SOURCES["nf4 bf16"])
IQ4_BF16_PTX = tl.constexpr(PTX_SOURCES["iq4 bf16"])
IQ4_F16_PTX = tl.constexpr(PTX_SOURCES["iq4 f16"])
NF4_HALF_PTX = tl.constexpr(PTX_SOURCES["nf4 half"])
THREE_BIT_INTS_PTX = tl.constexpr(PTX_SOURCES["three bit ints"])
THREE_BIT_SCALE_PAIRS_PTX = tl.constexpr(PTX_SOURCES["three bit scale pairs"])
TWO_BIT_INTS_PTX = tl.constexpr(PTX_SOURCES["two bit ints"])
TWO_BIT_SCALE_PAIRS_PTX = tl.constexpr(PTX_SOURCES["two bit scale pairs"])
NIBBLE_128_PTX = tl.constexpr(PTX_SOURCES["nibble 128"])
THREE_BIT_128_PTX = tl.constexpr(PTX_SOURCES["three bit 128"])
TWO_BIT_PTX = tl.constexpr(PTX_SOURCES["two bit"])
TWO_BIT_128_PTX = tl.constexpr(PTX_SOURCES["two bit 128"])
FIVE_BIT_128_PTX = tl.constexpr(PTX_SOURCES["five bit 128"])
SIX_BIT_PTX = tl.constexpr(PTX_SOURCES["six bit"])
SIX_BIT_128_PTX = tl.constexpr(PTX_SOURCES["six bit 128"])
BYTE_PTX = tl.constexpr(PTX_SOURCES["byte"])
# kvalues_iq4nl + 128 four to a little-endian word, for the portable twin's selects (signed, as Triton's int32
# constants are)
IQ4_WORD_0, IQ4_WORD_1, IQ4_WORD_2, IQ4_WORD_3 = (
    tl.constexpr(int.from_bytes(bytes(IQ4_OFFSET_BINARY[i:i + 4]), "little", signed=True)) for i in range(0, 16, 4))


@triton.jit
def int8_float_bits(words, BIASED: tl.constexpr):
    """int32 words of 4 int8 codes (element e in byte e) -> int32 bits of the float32 2^23 + code + 128 (`BIASED`:
    128 + (code + 128) / 256), `[R, C, 2, 2]`, in element order once reshaped to `[R, 4 C]`."""
    if PTX:
        bits = in_element_order(tl.inline_asm_elementwise(INT8_128_PTX if BIASED else INT8_PTX, "=r,=r,=r,=r,r",
                                                          [words], dtype=(tl.int32,) * 4, is_pure=True, pack=1))
    else:
        codes = (words[:, :, None] >> (8 * tl.arange(0, 4))[None, None, :]) & 255
        bits = tl.reshape(float_form(codes ^ 128, BIASED, True), (words.shape[0], words.shape[1], 2, 2))
    return bits


@triton.jit
def byte_float_bits(words, index):
    """The bits of the float32 2^23 + byte `index` (0-3, a tensor like `words`) of int32 `words`: one PRMT with the
    selector as an operand, where a shift by 8 index, a mask and an int -> float conversion took three instructions
    of the integer pipe (the K-quants' 6-bit sub-block scales, a byte each)."""
    if PTX:
        bits = tl.inline_asm_elementwise(BYTE_PTX, "=r,r,r", [words, BYTE_SELECTOR + index], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        bits = ((words >> (8 * index)) & 255) | FLOAT_OF_TWO_POW_23
    return bits


@triton.constexpr_function
def _shift_right_ptx(k: int) -> str:
    """`shr.b32 $0, $1, k` as `_shift_as_multiply` writes it."""
    return f"mul.hi.u32 $0, $1, {1 << (32 - k)};"


@triton.jit
def shift_right(x, K: tl.constexpr):
    """int32 `x` >> K, zero-filled, as one IMAD (`_shift_as_multiply`) where Triton's shift takes the integer pipe:
    written in Triton as a multiply-high by 2^(32 - K), LLVM turns it back into a shift."""
    if PTX:
        y = tl.inline_asm_elementwise(_shift_right_ptx(K), "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:
        y = (x >> K) & ((1 << (32 - K)) - 1)
    return y


@triton.jit
def float_form(v, BIASED: tl.constexpr, FULL_BYTES: tl.constexpr = False):
    """Portable: int32 codes -> the bits of the float32 2^23 + v, or with `BIASED` in the 128 form: 128 + v (v <
    128), or with `FULL_BYTES` 128 + v / 256 (v < 256)."""
    if BIASED:
        if FULL_BYTES:
            bits = (v << 8) | FLOAT_OF_128
        else:
            bits = (v << 16) | FLOAT_OF_128
    else:
        bits = v | FLOAT_OF_TWO_POW_23
    return bits


@triton.jit
def power_of_two(shift):
    """The float32 2^shift of int32 `shift`, -126 <= shift <= 127: its bits."""
    return ((shift + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def iq4_offset_binary(code):
    """kvalues_iq4nl[code] + 128: three selects pick the word holding the level, a shift brings its byte down."""
    word = tl.where(code < 8, tl.where(code < 4, IQ4_WORD_0, IQ4_WORD_1), tl.where(code < 12, IQ4_WORD_2, IQ4_WORD_3))
    return (word >> ((code & 3) * 8)) & 255


@triton.jit
def _word(tables_ptr, i):
    return tl.load((tables_ptr + i).to(tl.pointer_type(tl.int32)))


@triton.jit
def _word_tile(tables_ptr, i):
    """`_word` as a `[1, 1]` tensor, for asm calls on the tensor cores' operands: Triton decodes a tile straight
    into the operand's registers (moving the layout conversion up to its loads) only where every input of the decode
    comes from a tensor load, a constant or element-wise work on them, and a scalar's splat is none of those."""
    return tl.load((tables_ptr + i).to(tl.pointer_type(tl.int32)) + tl.zeros((1, 1), tl.int32))


@triton.jit
def _nibbles_in_element_order(v):
    """The 8 outputs of a nibble asm, the low nibbles' (elements 0, 2, 4, 6) then the high ones' (1, 3, 5, 7) ->
    `[R, C, 2, 2, 2]` in element order."""
    return in_element_order((v[0], v[4], v[1], v[5], v[2], v[6], v[3], v[7]))


@triton.jit
def _nibbles(words):
    """Portable: int32 words of 8 4-bit codes -> the codes, `[R, C, 8]` in element order."""
    return (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15


@triton.jit
def nibble_float_bits(codes, IQ4: tl.constexpr, tables_ptr, BIASED: tl.constexpr):
    """int32 words of 8 4-bit codes (element e at bits 4e) -> int32 bits of the float32 2^23 + v (`BIASED`:
    128 + v), `[R, C, 2, 2, 2]` in element order once reshaped to `[R, 8 C]`, where v is the code itself, or with IQ4
    kvalues_iq4nl[code] + 128 (its byte table at `tables_ptr`, `LOOKUP_WORDS`; `BIASED`: 128 + v / 256). A word an asm
    call: given bytes, 4 a call (pack=4), Triton decoded them in the tensor-core operand's register layout, two
    codes a thread in a row, which on Hopper byte-transposed the loaded words through shared memory and re-paired
    the bytes for each call (sm_90 split-K, per element: Q4_0 4.22 -> 3.68, Q4_K 4.57 -> 4.14). On mma.sync GPUs
    that counts fewer, so `codes` may also be uint8 bytes of two codes (the first in the low nibble), in the 128
    form: `[R, C, 2]` then, in element order once reshaped to `[R, 2 C]` (`decode_planes.FUSED_BYTES`)."""
    if codes.dtype == tl.uint8:
        tl.static_assert((BIASED > 0) and not IQ4, "bytes of 4-bit codes: the 128 form of the codes themselves")
        if PTX:
            low, high = tl.inline_asm_elementwise(NIBBLE_128_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [codes],
                                                  dtype=(tl.int32, tl.int32), is_pure=True, pack=4)
        else:
            low = float_form(codes.to(tl.int32) & 15, BIASED)
            high = float_form(codes.to(tl.int32) >> 4, BIASED)
        bits = tl.join(low, high)
    elif PTX:
        if IQ4:
            v = tl.inline_asm_elementwise(
                NIBBLE_IQ4_128_PTX if BIASED else NIBBLE_IQ4_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r" + ",r,r,r,r,r",
                [codes, _word(tables_ptr, IQ4_WORDS_AT), _word(tables_ptr, IQ4_WORDS_AT + 1),
                 _word(tables_ptr, IQ4_WORDS_AT + 2), _word(tables_ptr, IQ4_WORDS_AT + 3),
                 _word(tables_ptr, HALF_BITS_AT)],
                dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise(NIBBLE_128_PTX if BIASED else NIBBLE_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r",
                                          [codes], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        bits = _nibbles_in_element_order(v)
    else:
        v = _nibbles(codes)
        if IQ4:
            v = iq4_offset_binary(v)
        bits = tl.reshape(float_form(v, BIASED, IQ4), (codes.shape[0], codes.shape[1], 2, 2, 2))
    return bits


@triton.jit
def iq4_int8_bytes(codes, tables_ptr):
    """int32 words of 8 IQ4 codes (element e at bits 4e) -> their levels kvalues_iq4nl[code] as int8 bytes, two
    int32 words each `[R, C, 2]`: elements 0-3 in the bytes of the first, 4-7 of the second."""
    if PTX:
        low, high = tl.inline_asm_elementwise(
            NIBBLE_IQ4_INT8_PTX, "=r,=r,r,r,r,r,r,r",
            [codes, _word(tables_ptr, IQ4_INT8_WORDS_AT), _word(tables_ptr, IQ4_INT8_WORDS_AT + 1),
             _word(tables_ptr, IQ4_INT8_WORDS_AT + 2), _word(tables_ptr, IQ4_INT8_WORDS_AT + 3),
             _word(tables_ptr, HALF_BITS_AT)], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        words = tl.join(low, high)
    else:
        levels = tl.reshape(iq4_offset_binary(_nibbles(codes)) ^ 128, (codes.shape[0], codes.shape[1], 2, 4))
        words = tl.sum(levels << (8 * tl.arange(0, 4))[None, None, None, :], axis=3)
    return words


@triton.jit
def nf4_values(words, tables_ptr):
    """int32 words of 8 NF4 codes (element e at bits 4e) -> their float32 code-book values, `[R, C, 2, 2, 2]` in
    element order once reshaped to `[R, 8 C]` (`LOOKUP_WORDS` at `tables_ptr`: the values, and their byte
    tables)."""
    if PTX:
        v = tl.inline_asm_elementwise(
            NIBBLE_NF4_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r" + ",r,r,r,r" * 4 + ",r",
            [words, _word(tables_ptr, NF4_WORDS_AT), _word(tables_ptr, NF4_WORDS_AT + 1),
             _word(tables_ptr, NF4_WORDS_AT + 2), _word(tables_ptr, NF4_WORDS_AT + 3),
             _word(tables_ptr, NF4_WORDS_AT + 4), _word(tables_ptr, NF4_WORDS_AT + 5),
             _word(tables_ptr, NF4_WORDS_AT + 6), _word(tables_ptr, NF4_WORDS_AT + 7),
             _word(tables_ptr, NF4_WORDS_AT + 8), _word(tables_ptr, NF4_WORDS_AT + 9),
             _word(tables_ptr, NF4_WORDS_AT + 10), _word(tables_ptr, NF4_WORDS_AT + 11),
             _word(tables_ptr, NF4_WORDS_AT + 12), _word(tables_ptr, NF4_WORDS_AT + 13),
             _word(tables_ptr, NF4_WORDS_AT + 14), _word(tables_ptr, NF4_WORDS_AT + 15),
             _word(tables_ptr, HALF_BITS_AT)],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        values = _nibbles_in_element_order(v)
    else:
        values = tl.reshape(tl.load(tables_ptr + _nibbles(words)), (words.shape[0], words.shape[1], 2, 2, 2))
    return values


@triton.jit
def code_book_bf16(codes, scale, IQ4: tl.constexpr, tables_ptr):
    """int64 words of 16 4-bit codes of one block (element e at bits 4e) and the block's float32 scale -> the bf16
    weights value[code] * scale, NF4's values or with `IQ4` kvalues_iq4nl, in element order once reshaped to
    `[R, 16 C]`."""
    if PTX:
        w = in_element_order(tl.inline_asm_elementwise(IQ4_BF16_PTX if IQ4 else NF4_BF16_PTX, "=h," * 16 + "l,r,r",
                                                          [codes, scale, _word(tables_ptr, HALF_BITS_AT)],
                                                          dtype=(tl.bfloat16,) * 16, is_pure=True, pack=1))
    else:
        code = (codes[:, :, None] >> (4 * tl.arange(0, 16))[None, None, :]) & 15
        values = tables_ptr + IQ4_VALUES_AT if IQ4 else tables_ptr
        w = (tl.load(values + code.to(tl.int32)) * scale[:, :, None]).to(tl.bfloat16)
    return w


@triton.jit
def iq4_half_weights(codes, scale_pairs, tables_ptr):
    """int32 words of 8 IQ4 codes (element e at bits 4e) and, like them, their block's f16 scale in both halves of
    an int32 -> the f16 weights kvalues_iq4nl[code] * scale, rounded once, `[R, C, 2, 2, 2]` in element order once
    reshaped to `[R, 8 C]`."""
    if PTX:
        w = in_element_order(tl.inline_asm_elementwise(
            IQ4_F16_PTX, "=h," * 8 + "r" + ",r" * 8,
            [codes, scale_pairs, _word(tables_ptr, IQ4_WORDS_AT), _word(tables_ptr, IQ4_WORDS_AT + 1),
             _word(tables_ptr, IQ4_WORDS_AT + 2), _word(tables_ptr, IQ4_WORDS_AT + 3), _word(tables_ptr, HALF_BITS_AT),
             _word(tables_ptr, HALF_WORDS_AT), _word(tables_ptr, HALF_WORDS_AT + 1)],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1))
    else:
        levels = (iq4_offset_binary(_nibbles(codes)) - 128).to(tl.float32)
        scale = (scale_pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        # a level (8 bits) times an f16 scale (11) is exact in float32: one rounding, as the f16 multiply's
        w = tl.reshape((levels * scale[:, :, None]).to(tl.float16), (codes.shape[0], codes.shape[1], 2, 2, 2))
    return w


@triton.jit
def _words_by_quarter(tables_ptr, i, C: tl.constexpr):
    """Word i of NF4's level tables (`NF4_HALF_WORDS_AT`) as `[1, C]`, each quarter of the C columns from its own
    copy: the tensor cores' operand gives each lane of a quad a quarter (`decode_planes.in_operand_order`), so
    the lanes load the same values from different addresses. Loaded from one address, ptxas kept half of the words
    in uniform registers, which a prmt cannot take as its first operand, and copied them into registers for every
    lookup (sm_90 split-K: 128 IMAD a 128 x 64 tile)."""
    quarter = tl.arange(0, C)[None, :] // (C // 4)
    return tl.load((tables_ptr + NF4_HALF_WORDS_AT + i).to(tl.pointer_type(tl.int32)) + NF4_HALF_WORDS * quarter)


@triton.jit
def nf4_half_levels(codes, tables_ptr):
    """int32 words of 8 NF4 codes (element e at bits 4e), `[R, C]` with each quarter of C at a lane of the tensor
    cores' operand, -> the f16 NF4_LEVEL_SCALE * value[code] (`nf4_half_level_bits`), `[R, C, 2, 2, 2]` in element
    order once reshaped to `[R, 8 C]`."""
    if PTX:
        C: tl.constexpr = codes.shape[1]
        w = in_element_order(tl.inline_asm_elementwise(
            NF4_HALF_PTX, "=h," * 8 + "r" + ",r" * 10,
            [codes, _words_by_quarter(tables_ptr, 0, C), _words_by_quarter(tables_ptr, 1, C),
             _words_by_quarter(tables_ptr, 2, C), _words_by_quarter(tables_ptr, 3, C),
             _words_by_quarter(tables_ptr, 4, C), _words_by_quarter(tables_ptr, 5, C),
             _words_by_quarter(tables_ptr, 6, C), _words_by_quarter(tables_ptr, 7, C),
             _words_by_quarter(tables_ptr, 8, C), _words_by_quarter(tables_ptr, 9, C)],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1))
    else:
        levels = tl.load(tables_ptr + NF4_HALF_VALUES_AT + _nibbles(codes)).to(tl.float16)
        w = tl.reshape(levels, (codes.shape[0], codes.shape[1], 2, 2, 2))
    return w


@triton.jit
def in_element_order(v):
    """A tuple of 2^L tensors `[R, C]`, value i of element 2^L c + i -> `[R, C, 2, ..., 2]` (L twos), element order
    once reshaped to `[R, 2^L C]`. tl.join adds a last axis (index 0: its first argument), so the leaves pair
    element i with i + 2^(L-1) and the root parts even from odd."""
    if len(v) == 2:
        ordered = tl.join(v[0], v[1])
    else:
        ordered = tl.join(in_element_order(v[0::2]), in_element_order(v[1::2]))
    return ordered


@triton.jit
def _codes_and_top_bits(low, top, COUNT: tl.constexpr, WIDTH: tl.constexpr, TOP: tl.constexpr,
                        BIASED: tl.constexpr):
    """Portable: the bits of 2^23 + code (`BIASED`: 128 + code) of each of the `COUNT` elements of a word,
    `[R, C, COUNT]` in element order: element e's low `WIDTH` bits from `low` (at bits `WIDTH` e), its top `TOP`
    bits from `top` (at bits `TOP` e)."""
    e = tl.arange(0, COUNT)[None, None, :]
    low_bits = (low[:, :, None] >> (WIDTH * e)) & ((1 << WIDTH) - 1)
    return float_form(low_bits | (((top[:, :, None] >> (TOP * e)) & ((1 << TOP) - 1)) << WIDTH), BIASED)


@triton.jit
def two_bit_float_bits(words, BIASED: tl.constexpr):
    """Q2_K codes, 16 elements a word: int32 words of 2-bit codes (element e at bits 2e) -> int32 bits of the
    float32 2^23 + code (`BIASED`: 128 + code), in element order once reshaped to `[R, 16 C]`. Triton's own shifts,
    masks and joins on the bytes took 3.5 integer instructions an element (sm_90 split-K), byte-transposed through
    shared memory."""
    if PTX:
        bits = in_element_order(tl.inline_asm_elementwise(TWO_BIT_128_PTX if BIASED else TWO_BIT_PTX, "=r," * 16 + "r",
                                                          [words], dtype=(tl.int32,) * 16, is_pure=True, pack=1))
    else:
        bits = float_form((words[:, :, None] >> (2 * tl.arange(0, 16))[None, None, :]) & 3, BIASED)
    return bits


@triton.jit
def _third_bits_in_element_order(third):
    """Q3_K's third bits of 16 elements as its decoders take them -> bit e: element e's. They take them spread a
    nibble to a byte, bit i of byte b being element 4b + i's and bits 4-7 anything, as its planes hold them
    (`kernels.repack.PLANE_ORDERS`), a word for 32 elements: the first 16's, or shifted down 4 the others'."""
    return (third & 0xF) | ((third >> 4) & 0xF0) | ((third >> 8) & 0xF00) | ((third >> 12) & 0xF000)


@triton.jit
def three_bit_float_bits(low, third, BIASED: tl.constexpr):
    """Q3_K codes, 16 elements a word: `low` int32 words of 2-bit fields (element e at bits 2e), `third` their
    third bits (spread a nibble to a byte: `_third_bits_in_element_order`) -> int32 bits of the float32 2^23 + code
    (`BIASED`: 128 + code), in element order once reshaped to `[R, 16 C]`."""
    if PTX:
        bits = in_element_order(tl.inline_asm_elementwise(THREE_BIT_128_PTX if BIASED else THREE_BIT_PTX,
                                                             "=r," * 16 + "r,r", [low, third],
                                                             dtype=(tl.int32,) * 16, is_pure=True, pack=1))
    else:
        bits = _codes_and_top_bits(low, _third_bits_in_element_order(third), 16, 2, 1, BIASED)
    return bits


@triton.jit
def _bf16_bits(v):
    """float32 values exact in bf16 -> their bf16 bits in both halves of an int32."""
    bits = v.to(tl.int32, bitcast=True) >> 16
    return (bits & 0xFFFF) | (bits << 16)


@triton.jit
def bf16_halves(pairs):
    """int32 words of two bf16 -> `[R, C, 2]` bf16, the low half first."""
    if PTX:
        low, high = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        low = (pairs << 16).to(tl.float32, bitcast=True).to(tl.bfloat16)
        high = (pairs & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)
    return tl.join(low, high)


@triton.jit
def int_scale_pairs(words, index, THREE_BIT: tl.constexpr, tables_ptr):
    """Byte `index` (0-3) of int32 `words`, sub-block scales -> (the bf16 s in both halves of an int32, the bf16 f s
    likewise), the integer tiles' scales: with `THREE_BIT` (Q3_K's 6-bit scales) s = scale - 32, f = -12
    (`three_bit_ints`), else (Q2_K's 4-bit ones, and its mins, of which only s is used) s = scale, f = -128
    (`two_bit_ints`)."""
    if PTX:
        pairs = tl.inline_asm_elementwise(THREE_BIT_SCALE_PAIRS_PTX if THREE_BIT else TWO_BIT_SCALE_PAIRS_PTX,
                                          "=r,=r,r,r,r", [words, 0x4040 + 0x101 * index,
                                                          _word_tile(tables_ptr, BF16_INT_WORDS_AT + 1)],
                                          dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        OFFSET: tl.constexpr = 32 if THREE_BIT else 0
        FACTOR: tl.constexpr = -12.0 if THREE_BIT else -128.0
        scale = (((words >> (8 * index)) & 255) - OFFSET).to(tl.float32)
        pairs = _bf16_bits(scale), _bf16_bits(FACTOR * scale)
    return pairs


@triton.jit
def _transposed_4x4(w):
    """`[R, C, 16]` -> each 16 in 4 x 4 transposed order (position 4i + j: element 4j + i)."""
    return tl.reshape(tl.permute(tl.reshape(w, (w.shape[0], w.shape[1], 4, 4)), (0, 1, 3, 2)), w.shape)


@triton.jit
def two_bit_ints(codes, scale_pairs, offset_pairs, tables_ptr):
    """Q2_K codes, 16 elements a word (element e at bits 2e) and their sub-block's `int_scale_pairs` -> the bf16
    exact integers code * scale * `two_bit_factors`, `[R, C, 16]`-shaped in `in_two_bit_order` once reshaped to
    `[R, 16 C]`."""
    if PTX:
        w = in_element_order(tl.inline_asm_elementwise(
            TWO_BIT_INTS_PTX, "=h," * 16 + "r,r,r,r",
            [codes, scale_pairs, offset_pairs, _word_tile(tables_ptr, BF16_INT_WORDS_AT + 2)],
            dtype=(tl.bfloat16,) * 16, is_pure=True, pack=1))
    else:
        e = tl.arange(0, 16)[None, None, :]
        q = (codes[:, :, None] >> (2 * e)) & 3
        scale = (scale_pairs << 16).to(tl.float32, bitcast=True)[:, :, None]
        w = in_two_bit_order((q * two_bit_factors(e)).to(tl.float32) * scale).to(tl.bfloat16)
    return w


@triton.jit
def two_bit_factors(e):
    """The power of two `two_bit_ints` multiplies element e (of 16) by: 1, 4, 16, 16 for fields 0-3 (e % 4)."""
    return 1 << (2 * tl.minimum(e % 4, 2))


@triton.jit
def in_two_bit_order(v):
    """`[R, C, 16]`, each 16 in element order -> in `two_bit_ints`' order: position 4i + 2c + h holds element
    4 (c + 2h) + i, field i of byte c + 2h (bytes 0 and 2 pair, as do 1 and 3)."""
    return tl.reshape(tl.permute(tl.reshape(v, (v.shape[0], v.shape[1], 2, 2, 4)), (0, 1, 4, 3, 2)), v.shape)


@triton.jit
def three_bit_ints(low, third, scales, offsets, next_scales, next_offsets, tables_ptr):
    """Q3_K codes, 32 elements (two sub-blocks) a call (`low`: int64 words of 2-bit fields, element e at bits 2e;
    `third`: int32 words of their third bits, the plane's: `_third_bits_in_element_order`) and the two sub-blocks'
    `int_scale_pairs` -> the bf16 (code - 4) * (scale - 32), exact integers, `[R, C, 32]`-shaped with each 16 in 4 x
    4 transposed order (position 4i + j: element 4j + i) once reshaped to `[R, 32 C]`."""
    if PTX:
        w = in_element_order(tl.inline_asm_elementwise(
            THREE_BIT_INTS_PTX, "=h," * 32 + "l,r,r,r,r,r,r",
            [low, third, scales, offsets, next_scales, next_offsets, _word_tile(tables_ptr, BF16_INT_WORDS_AT)],
            dtype=(tl.bfloat16,) * 32, is_pure=True, pack=1))
    else:
        w = tl.join(_three_bit_ints_of_16((low & 0xFFFFFFFF).to(tl.int32), third, scales),
                    _three_bit_ints_of_16((low >> 32).to(tl.int32), third >> 4, next_scales))
        w = tl.reshape(tl.permute(w, (0, 1, 3, 2)), (low.shape[0], low.shape[1], 32))
    return w


@triton.jit
def _three_bit_ints_of_16(low, third, scale_pairs):
    """Portable `three_bit_ints` of one sub-block: `[R, C, 16]`."""
    e = tl.arange(0, 16)[None, None, :]
    third = _third_bits_in_element_order(third)[:, :, None]
    codes = ((low[:, :, None] >> (2 * e)) & 3) | (((third >> e) & 1) << 2)
    scale = (scale_pairs << 16).to(tl.float32, bitcast=True)[:, :, None]
    return _transposed_4x4(((codes - 4).to(tl.float32) * scale).to(tl.bfloat16))


@triton.jit
def _eight_with_top_bits(low, top, ASM: tl.constexpr, ASM_128: tl.constexpr, TOP: tl.constexpr,
                         BIASED: tl.constexpr):
    """8 elements a word: `low` int32 words of their low 4 bits (element e at bits 4e), `top` their top `TOP` bits
    (at bits `TOP` e, zero-extended) -> int32 bits of the float32 2^23 + code by the asm `ASM` (`BIASED`: 128 +
    code by `ASM_128`), in element order once reshaped to `[R, 8 C]`."""
    if PTX:
        bits = in_element_order(tl.inline_asm_elementwise(ASM_128 if BIASED else ASM, "=r," * 8 + "r,r", [low, top],
                                                            dtype=(tl.int32,) * 8, is_pure=True, pack=1))
    else:
        bits = _codes_and_top_bits(low, top, 8, 4, TOP, BIASED)
    return bits


@triton.jit
def five_bit_float_bits(low, fifth, BIASED: tl.constexpr):
    """5-bit codes (Q5_0, Q5_1, Q5_K): `_eight_with_top_bits`, the fifth bits bit e of zero-extended bytes."""
    return _eight_with_top_bits(low, fifth, FIVE_BIT_PTX, FIVE_BIT_128_PTX, 1, BIASED)


@triton.jit
def six_bit_float_bits(low, top, BIASED: tl.constexpr):
    """Q6_K codes: `_eight_with_top_bits`, the top 2 bits at bits 2e of zero-extended 16-bit words."""
    return _eight_with_top_bits(low, top, SIX_BIT_PTX, SIX_BIT_128_PTX, 2, BIASED)
