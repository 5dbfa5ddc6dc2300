"""The PRMT assembly of kernels/triton/float_bits.py, run on a model of the PTX instructions it uses (as the PTX ISA
defines them), against the definition: every byte value in every position of the packed register gives the bits of
2^23 + v. Without a GPU the kernels take the portable twins (tests/test_triton_kernels.py); this checks the text the
GPU runs. tests/test_triton_compile.py checks that it compiles, a CUDA run that it decodes bit-identically."""

import re

import numpy as np
import pytest

from kernels.formats import IQ4_VALUES, NF4_VALUES
from kernels.triton.float_bits import IQ4_WORDS_AT, LOOKUP_WORDS, NF4_WORDS_AT, PTX_SOURCES

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


OPS = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "xor.b32": lambda a, b: a ^ b,
       "shr.b32": lambda a, b: a >> b, "shl.b32": lambda a, b: a << b, "mul.lo.u32": lambda a, b: a * b,
       "mov.b32": lambda a: a, "prmt.b32": prmt}


def run_ptx(source: str, operands: dict[str, int]) -> dict[str, int]:
    """Executes `source` (one instruction a line, braces and .reg declarations) on 32-bit registers; `operands` gives
    the $n inputs, the result holds every register written."""
    registers = dict(operands)
    for line in source.splitlines():
        line = line.split("//")[0].strip()
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        opcode, rest = line.rstrip(";").split(None, 1)
        destination, *args = [part.strip() for part in rest.split(",")]
        values = [int(a, 0) if re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)", a) else registers[a] for a in args]
        registers[destination] = OPS[opcode](*values) & MASK
    return registers


def pack(values) -> int:
    """Four bytes in one register, the first in the lowest bits (as Triton packs them)."""
    return int.from_bytes(bytes(int(v) for v in values), "little")


def float_bits(v: int) -> int:
    return 0x4B000000 | v


@pytest.mark.parametrize("seed", range(4))
def test_int8_bits(seed):
    rng = np.random.default_rng(seed)
    for _ in range(64):
        codes = rng.integers(0, 256, 4)
        out = run_ptx(PTX_SOURCES["int8"], {"$4": pack(codes)})
        int8 = codes.astype(np.uint8).view(np.int8)
        assert [out[f"${i}"] for i in range(4)] == [float_bits(int(v) + 128) for v in int8]


NF4_BITS = [int(b) for b in np.asarray(NF4_VALUES, dtype=np.float32).view(np.uint32)]
# the byte-table words each asm takes as operands from $9 on, every fourth (pack=4), as the kernels pass them
TABLE_WORDS = {"nibble": [], "nibble iq4": LOOKUP_WORDS[IQ4_WORDS_AT:IQ4_WORDS_AT + 4],
               "nibble nf4": LOOKUP_WORDS[NF4_WORDS_AT:NF4_WORDS_AT + 16]}


def test_lookup_words_start_with_the_nf4_values():
    # the portable twins and the blocks decoder gather NF4 values from the start of the same table
    assert list(LOOKUP_WORDS[:16]) == NF4_BITS


@pytest.mark.parametrize("name,table", [("nibble", [float_bits(v) for v in range(16)]),
                                        ("nibble iq4", [float_bits(v + 128) for v in IQ4_VALUES]),
                                        ("nibble nf4", NF4_BITS)])
def test_nibble_lookups_every_code_in_every_position(name, table):
    words = {f"${9 + 4 * i}": word for i, word in enumerate(TABLE_WORDS[name])}
    # every code as the low and the high nibble of every byte, next to every other code
    for low_code in range(16):
        for high_code in range(16):
            for position in range(4):
                codes = [(3 * position + 5 * i) % 256 for i in range(4)]
                codes[position] = low_code | (high_code << 4)
                out = run_ptx(PTX_SOURCES[name], {"$8": pack(codes), **words})
                assert [out[f"${i}"] for i in range(4)] == [table[c & 15] for c in codes]
                assert [out[f"${i + 4}"] for i in range(4)] == [table[c >> 4] for c in codes]


@pytest.mark.parametrize("seed", range(4))
def test_three_bit_codes(seed):
    rng = np.random.default_rng(seed)
    words = [0, 0xFFFFFFFF] + [int(w) for w in rng.integers(0, 2**32, 62, dtype=np.uint64)]
    thirds = [0xFFFF, 0] + [int(h) for h in rng.integers(0, 2**16, 62)]
    for low, third in zip(words, thirds):
        out = run_ptx(PTX_SOURCES["three bit"], {"$16": low, "$17": third})
        expected = [float_bits(((low >> (2 * e)) & 3) | (((third >> e) & 1) << 2)) for e in range(16)]
        assert [out[f"${e}"] for e in range(16)] == expected


@pytest.mark.parametrize("seed", range(4))
def test_five_bit_codes(seed):
    rng = np.random.default_rng(seed)
    words = [0, 0xFFFFFFFF] + [int(w) for w in rng.integers(0, 2**32, 254, dtype=np.uint64)]
    for low, fifth in zip(words, [0xFF, 0] + list(range(254))):
        out = run_ptx(PTX_SOURCES["five bit"], {"$8": low, "$9": fifth})
        expected = [float_bits(((low >> (4 * e)) & 15) | (((fifth >> e) & 1) << 4)) for e in range(8)]
        assert [out[f"${e}"] for e in range(8)] == expected


def test_prmt_model_matches_the_ptx_manual_example():
    # the byte-permute example of CUB's PRMT documentation: {b, a} = 0x07060504_03020100, selector 0x7531
    assert prmt(0x03020100, 0x07060504, 0x7531) == 0x07050301
    assert prmt(0x00000080, 0, 0x4448) == 0x000000FF  # bit 3: the selected byte's sign, replicated
