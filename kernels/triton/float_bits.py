"""Codes -> float32 bit patterns by the mantissa trick, four codes per 32-bit register with PRMT byte permutes.

A code byte `v` placed in the low bits of 2^23's bit pattern (0x4B000000) is the float 2^23 + v; one float
subtraction then gives the value exactly (`decode_planes._bits_to_float`). The planes decoders receive their
codes' bytes as packed 32-bit registers; here, on NVIDIA GPUs, one `prmt` per code moves a byte into that pattern
(and, for 4-bit codes, two more `prmt`s look 4 codes up in a 16-entry byte table held in four registers), where
Triton's own code would extract every byte, mask it, shift it and OR it in (sm_90: IQ4_NL's GEMM counted 16.5
instructions a decoded element with three selects per code).

Each function has a portable twin in plain Triton, taken under Triton's interpreter (which runs no assembly) and on
GPUs that are not NVIDIA's. `PTX_SOURCES` holds the assembly as text: tests/test_float_bits.py runs it through a
small model of the PTX instructions it uses against the portable definition, since no GPU is needed to read it.
"""

import numpy as np
import triton
import triton.language as tl
import torch

from kernels.formats import IQ4_VALUES, NF4_VALUES

# inline PTX only where Triton compiles for an NVIDIA GPU (the interpreter and ROCm take the portable twins)
PTX = tl.constexpr(not triton.knobs.runtime.interpret and torch.version.hip is None)
FLOAT_OF_TWO_POW_23 = tl.constexpr(0x4B000000)  # 2^23's float32 bits: OR a value < 2^23 in, it lands in the mantissa


def _assemble(lines: list[str]) -> str:
    """One PTX block, its scratch registers (every name written that is not an operand $n) declared."""
    names = dict.fromkeys(line.split()[1].rstrip(",") for line in lines)
    scratch = ", ".join(name for name in names if not name.startswith("$"))
    return "{\n.reg .b32 " + scratch + ";\n" + "\n".join(lines) + "\n}"


def _float_bits_of_bytes(sources: list[tuple[str, int]]) -> list[str]:
    """Output $i: the bits of 2^23 + byte `byte` of register `source` (the i-th pair): that byte, two zero bytes
    and 0x4B from the constant 0x4B000000."""
    return [f"prmt.b32 ${i}, {source}, 0x4B000000, 0x744{byte};" for i, (source, byte) in enumerate(sources)]


def _int8_bits_ptx() -> str:
    """4 packed int8 codes ($4) -> the bits of 2^23 + code + 128 for each ($0-$3): flipping the sign bit makes
    two's complement offset binary."""
    return _assemble(["xor.b32 b, $4, 0x80808080;"] + _float_bits_of_bytes([("b", i) for i in range(4)]))


def _lookups(tables: list[tuple[int, ...]]) -> list[str]:
    """PTX: for the 8 4-bit codes of $8 (element order, low nibble first), byte `table[code]` of each 16-entry byte
    table k into register vak (elements 0-3, a byte each) and vbk (elements 4-7).

    prmt picks byte (selector & 7) of 8, here one half of the table in two registers: the codes' low 3 bits pick
    from both halves, a second prmt picks the half by the code's bit 3. Selector bit 3 would sign-replicate the
    byte, hence the mask 0x77777777."""
    lines = ["and.b32 qa, $8, 0x77777777;",  # selectors of elements 0-3 in the low 16 bits
             "shr.b32 qb, qa, 16;",  # of elements 4-7
             "shr.b32 sa, $8, 1;",  # second selectors: byte i of the first half's result, or (i + 4) the second's
             "and.b32 sa, sa, 0x44444444;",
             "or.b32 sa, sa, 0x32103210;",
             "shr.b32 sb, sa, 16;"]
    for k, table in enumerate(tables):
        words = [int.from_bytes(bytes(table[i:i + 4]), "little") for i in range(0, 16, 4)]
        lines += [f"mov.b32 t{k}{i}, {word:#010x};" for i, word in enumerate(words)]
        for half in "ab":
            lines += [f"prmt.b32 lo, t{k}0, t{k}1, q{half};", f"prmt.b32 hi, t{k}2, t{k}3, q{half};",
                      f"prmt.b32 v{half}{k}, lo, hi, s{half};"]
    return lines


# element 2j is byte j's low nibble, 2j + 1 its high one: which (register, byte) holds each of the 8 elements
_LOW_ELEMENTS = [("a", 0), ("a", 2), ("b", 0), ("b", 2)]
_HIGH_ELEMENTS = [("a", 1), ("a", 3), ("b", 1), ("b", 3)]


def _nibble_bits_ptx(table: tuple[int, ...] | None) -> str:
    """4 packed bytes ($8) of two 4-bit codes -> the bits of 2^23 + table[code] for the low nibbles ($0-$3) and
    the high ones ($4-$7); no table: the code itself."""
    if table is None:
        lines = ["and.b32 va0, $8, 0x0f0f0f0f;", "shr.b32 vb0, $8, 4;", "and.b32 vb0, vb0, 0x0f0f0f0f;"]
        elements = [("va0", i) for i in range(4)] + [("vb0", i) for i in range(4)]
    else:
        lines = _lookups([table])
        elements = [(f"v{half}0", byte) for half, byte in _LOW_ELEMENTS + _HIGH_ELEMENTS]
    return _assemble(lines + _float_bits_of_bytes(elements))


def _nibble_float32_ptx(values: tuple[float, ...]) -> str:
    """4 packed bytes ($8) of two 4-bit codes -> the float32 bits of values[code], low nibbles ($0-$3), high ones
    ($4-$7): one byte table per byte of the float32, then a 4 x 4 byte transpose per 4 elements."""
    bits = [int(b) for b in np.asarray(values, dtype="<f4").view("<u4")]
    lines = _lookups([tuple((b >> (8 * k)) & 0xFF for b in bits) for k in range(4)])
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


IQ4_OFFSET_BINARY = tuple(v + 128 for v in IQ4_VALUES)  # kvalues_iq4nl as bytes: value + 128
PTX_SOURCES = {"int8": _int8_bits_ptx(), "nibble": _nibble_bits_ptx(None),
               "nibble iq4": _nibble_bits_ptx(IQ4_OFFSET_BINARY), "nibble nf4": _nibble_float32_ptx(NF4_VALUES)}
INT8_PTX = tl.constexpr(PTX_SOURCES["int8"])
NIBBLE_PTX = tl.constexpr(PTX_SOURCES["nibble"])
NIBBLE_IQ4_PTX = tl.constexpr(PTX_SOURCES["nibble iq4"])
NIBBLE_NF4_PTX = tl.constexpr(PTX_SOURCES["nibble nf4"])
# kvalues_iq4nl + 128 four to a little-endian word, for the portable twin's selects (signed, as Triton's int32
# constants are)
IQ4_WORD_0, IQ4_WORD_1, IQ4_WORD_2, IQ4_WORD_3 = (
    tl.constexpr(int.from_bytes(bytes(IQ4_OFFSET_BINARY[i:i + 4]), "little", signed=True)) for i in range(0, 16, 4))


@triton.jit
def int8_float_bits(b):
    """uint8 bytes of int8 codes -> int32 bits of the float32 2^23 + code + 128."""
    if PTX:
        bits = tl.inline_asm_elementwise(INT8_PTX, "=r,=r,=r,=r,r", [b], dtype=tl.int32, is_pure=True, pack=4)
    else:
        bits = (b.to(tl.int32) ^ 128) | FLOAT_OF_TWO_POW_23
    return bits


@triton.jit
def iq4_offset_binary(code):
    """kvalues_iq4nl[code] + 128: three selects pick the word holding the level, a shift brings its byte down."""
    word = tl.where(code < 8, tl.where(code < 4, IQ4_WORD_0, IQ4_WORD_1), tl.where(code < 12, IQ4_WORD_2, IQ4_WORD_3))
    return (word >> ((code & 3) * 8)) & 255


@triton.jit
def nibble_float_bits(b, IQ4: tl.constexpr):
    """uint8 bytes of two 4-bit codes -> int32 bits of the float32 2^23 + v for the low nibble and for the high
    one, where v is the code itself, or with IQ4 kvalues_iq4nl[code] + 128."""
    if PTX:
        if IQ4:
            low, high = tl.inline_asm_elementwise(NIBBLE_IQ4_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                                  dtype=(tl.int32, tl.int32), is_pure=True, pack=4)
        else:
            low, high = tl.inline_asm_elementwise(NIBBLE_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                                  dtype=(tl.int32, tl.int32), is_pure=True, pack=4)
    else:
        low = b.to(tl.int32) & 15
        high = b.to(tl.int32) >> 4
        if IQ4:
            low = iq4_offset_binary(low)
            high = iq4_offset_binary(high)
        low = low | FLOAT_OF_TWO_POW_23
        high = high | FLOAT_OF_TWO_POW_23
    return low, high


@triton.jit
def nf4_values(b, table_ptr):
    """uint8 bytes of two NF4 codes -> the float32 code-book values of the low nibble's code and of the high one's
    (the portable twin gathers them from the table at `table_ptr`)."""
    if PTX:
        low, high = tl.inline_asm_elementwise(NIBBLE_NF4_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                              dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    else:
        low = tl.load(table_ptr + (b.to(tl.int32) & 15))
        high = tl.load(table_ptr + (b.to(tl.int32) >> 4))
    return low, high
