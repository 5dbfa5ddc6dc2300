"""Per-format "decode a tile" device functions: raw blocks -> float32 weights, element by element.

`decode_tile(w_ptr, row_offset, k, mask, FMT, tables_ptr)` takes the weight's base pointer, the byte offsets of a
tile's rows (`[BLOCK_N, 1]`, int32: every Flux weight is far below 2 GB) and logical column indices (`[1, BLOCK_K]`)
and returns the `[BLOCK_N, BLOCK_K]` weights. Offsets stay 32-bit until each load: 64-bit pointer tiles would double
the registers the decode needs. Each branch reads the bytes an element needs straight
from the block layout: block sizes, field offsets and code books come from the registry (`kernels.formats`), the bit
order within each field is written down in `kernels/reference/<family>.py` (the numpy twin it is tested against);
scale bytes are re-read per element and served from L1/L2. Format ids come from the registry (`FORMAT_IDS`), and the
`FMT` constexpr picks one branch at compile time.
"""

import triton
import triton.language as tl

from kernels.formats import FORMATS
from kernels.triton.float_bits import iq4_offset_binary

FORMAT_IDS = {name: i for i, name in enumerate(FORMATS)}
KERNEL_FORMATS = tuple(name for name, f in FORMATS.items() if f.is_quantized)


def _block(fmt: str):
    """(elements, bytes) of one `fmt` block, as Triton constants."""
    return tl.constexpr(FORMATS[fmt].block_size), tl.constexpr(FORMATS[fmt].block_bytes)


def _offsets(fmt: str, *fields: str):
    """Byte offsets of the named fields of a `fmt` block, as Triton constants."""
    return tuple(tl.constexpr(FORMATS[fmt].offset(field)) for field in fields)


Q8_0 = tl.constexpr(FORMAT_IDS["Q8_0"])
Q6_K = tl.constexpr(FORMAT_IDS["Q6_K"])
Q5_K = tl.constexpr(FORMAT_IDS["Q5_K"])
Q5_1 = tl.constexpr(FORMAT_IDS["Q5_1"])
Q5_0 = tl.constexpr(FORMAT_IDS["Q5_0"])
Q4_K = tl.constexpr(FORMAT_IDS["Q4_K"])
Q4_1 = tl.constexpr(FORMAT_IDS["Q4_1"])
Q4_0 = tl.constexpr(FORMAT_IDS["Q4_0"])
Q3_K = tl.constexpr(FORMAT_IDS["Q3_K"])
Q2_K = tl.constexpr(FORMAT_IDS["Q2_K"])
IQ4_NL = tl.constexpr(FORMAT_IDS["IQ4_NL"])
IQ4_XS = tl.constexpr(FORMAT_IDS["IQ4_XS"])
NF4 = tl.constexpr(FORMAT_IDS["NF4"])

Q8_0_QK, Q8_0_BYTES = _block("Q8_0")
Q8_0_D, Q8_0_QS = _offsets("Q8_0", "d", "qs")
Q4_0_QK, Q4_0_BYTES = _block("Q4_0")
Q4_0_D, Q4_0_QS = _offsets("Q4_0", "d", "qs")
Q4_1_QK, Q4_1_BYTES = _block("Q4_1")
Q4_1_D, Q4_1_M, Q4_1_QS = _offsets("Q4_1", "d", "m", "qs")
Q5_0_QK, Q5_0_BYTES = _block("Q5_0")
Q5_0_D, Q5_0_QH, Q5_0_QS = _offsets("Q5_0", "d", "qh", "qs")
Q5_1_QK, Q5_1_BYTES = _block("Q5_1")
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = _offsets("Q5_1", "d", "m", "qh", "qs")
IQ4_NL_QK, IQ4_NL_BYTES = _block("IQ4_NL")
IQ4_NL_D, IQ4_NL_QS = _offsets("IQ4_NL", "d", "qs")
Q2_K_QK, Q2_K_BYTES = _block("Q2_K")
Q2_K_SCALES, Q2_K_QS, Q2_K_D, Q2_K_DMIN = _offsets("Q2_K", "scales", "qs", "d", "dmin")
Q3_K_QK, Q3_K_BYTES = _block("Q3_K")
Q3_K_HMASK, Q3_K_QS, Q3_K_SCALES, Q3_K_D = _offsets("Q3_K", "hmask", "qs", "scales", "d")
Q4_K_QK, Q4_K_BYTES = _block("Q4_K")
Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS = _offsets("Q4_K", "d", "dmin", "scales", "qs")
Q5_K_QK, Q5_K_BYTES = _block("Q5_K")
Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QH, Q5_K_QS = _offsets("Q5_K", "d", "dmin", "scales", "qh", "qs")
Q6_K_QK, Q6_K_BYTES = _block("Q6_K")
Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D = _offsets("Q6_K", "ql", "qh", "scales", "d")
IQ4_XS_QK, IQ4_XS_BYTES = _block("IQ4_XS")
IQ4_XS_D, IQ4_XS_SCALES_H, IQ4_XS_SCALES_L, IQ4_XS_QS = _offsets("IQ4_XS", "d", "scales_h", "scales_l", "qs")
NF4_QK, NF4_BYTES = _block("NF4")
NF4_ABSMAX, NF4_QS = _offsets("NF4", "absmax", "qs")
@triton.jit
def _u8(w_ptr, offset, mask):
    return tl.load(w_ptr + offset, mask=mask, other=0).to(tl.int32)


@triton.jit
def _i8(w_ptr, offset, mask):
    return tl.load(w_ptr + offset, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def _f16(w_ptr, offset, mask):
    bits = _u8(w_ptr, offset, mask) | (_u8(w_ptr, offset + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f32(w_ptr, offset, mask):
    bits = (_u8(w_ptr, offset, mask) | (_u8(w_ptr, offset + 1, mask) << 8) | (_u8(w_ptr, offset + 2, mask) << 16)
            | (_u8(w_ptr, offset + 3, mask) << 24))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nibble(byte, high):
    return (byte >> (4 * high)) & 15


@triton.jit
def _iq4_value(code):
    return (iq4_offset_binary(code) - 128).to(tl.float32)


@triton.jit
def _nf4_value(code, table_ptr):
    return tl.load(table_ptr + code)


@triton.jit
def _k_scale_min(w_ptr, s, j, mask):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block j from the 12 scale bytes at `s` (ggml's get_scale_min_k4)."""
    low = j < 4
    a = _u8(w_ptr, s + tl.where(low, j, j + 4), mask)
    b = _u8(w_ptr, s + tl.where(low, j + 4, j - 4), mask)
    c = _u8(w_ptr, s + j, mask)
    sc = tl.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
    m = tl.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def decode_tile(w_ptr, row_offset, k, mask, FMT: tl.constexpr, tables_ptr):
    """Weights `[BLOCK_N, BLOCK_K]` float32 at row byte offsets `row_offset` and logical columns `k`."""
    if FMT == Q8_0:
        blk = row_offset + (k // Q8_0_QK) * Q8_0_BYTES
        w = _f16(w_ptr, blk + Q8_0_D, mask) * _i8(w_ptr, blk + Q8_0_QS + k % Q8_0_QK, mask)
    elif FMT == Q4_0:
        blk = row_offset + (k // Q4_0_QK) * Q4_0_BYTES
        j = k % Q4_0_QK
        q = _nibble(_u8(w_ptr, blk + Q4_0_QS + j % 16, mask), j // 16)
        w = (q - 8).to(tl.float32) * _f16(w_ptr, blk + Q4_0_D, mask)
    elif FMT == Q4_1:
        blk = row_offset + (k // Q4_1_QK) * Q4_1_BYTES
        j = k % Q4_1_QK
        q = _nibble(_u8(w_ptr, blk + Q4_1_QS + j % 16, mask), j // 16)
        w = q.to(tl.float32) * _f16(w_ptr, blk + Q4_1_D, mask) + _f16(w_ptr, blk + Q4_1_M, mask)
    elif FMT == Q5_0:
        blk = row_offset + (k // Q5_0_QK) * Q5_0_BYTES
        j = k % Q5_0_QK
        high = (_u8(w_ptr, blk + Q5_0_QH + j // 8, mask) >> (j % 8)) & 1
        q = _nibble(_u8(w_ptr, blk + Q5_0_QS + j % 16, mask), j // 16) | (high << 4)
        w = (q - 16).to(tl.float32) * _f16(w_ptr, blk + Q5_0_D, mask)
    elif FMT == Q5_1:
        blk = row_offset + (k // Q5_1_QK) * Q5_1_BYTES
        j = k % Q5_1_QK
        high = (_u8(w_ptr, blk + Q5_1_QH + j // 8, mask) >> (j % 8)) & 1
        q = _nibble(_u8(w_ptr, blk + Q5_1_QS + j % 16, mask), j // 16) | (high << 4)
        w = q.to(tl.float32) * _f16(w_ptr, blk + Q5_1_D, mask) + _f16(w_ptr, blk + Q5_1_M, mask)
    elif FMT == IQ4_NL:
        blk = row_offset + (k // IQ4_NL_QK) * IQ4_NL_BYTES
        j = k % IQ4_NL_QK
        code = _nibble(_u8(w_ptr, blk + IQ4_NL_QS + j % 16, mask), j // 16)
        w = _f16(w_ptr, blk + IQ4_NL_D, mask) * _iq4_value(code)
    elif FMT == Q2_K:
        blk = row_offset + (k // Q2_K_QK) * Q2_K_BYTES
        e = k % Q2_K_QK
        sc = _u8(w_ptr, blk + Q2_K_SCALES + e // 16, mask)
        q = (_u8(w_ptr, blk + Q2_K_QS + 32 * (e // 128) + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        dl = _f16(w_ptr, blk + Q2_K_D, mask) * (sc & 15).to(tl.float32)
        ml = _f16(w_ptr, blk + Q2_K_DMIN, mask) * (sc >> 4).to(tl.float32)
        w = dl * q.to(tl.float32) - ml
    elif FMT == Q3_K:
        blk = row_offset + (k // Q3_K_QK) * Q3_K_BYTES
        e = k % Q3_K_QK
        j = e // 16
        high = (_u8(w_ptr, blk + Q3_K_HMASK + e % 32, mask) >> (e // 32)) & 1
        low = (_u8(w_ptr, blk + Q3_K_QS + 32 * (e // 128) + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        # 12 scale bytes: the low nibbles of the 16 scales in bytes 0..7, their top 2 bits in bytes 8..11
        sc_low = _nibble(_u8(w_ptr, blk + Q3_K_SCALES + j % 8, mask), j // 8)
        sc_high = (_u8(w_ptr, blk + Q3_K_SCALES + 8 + j % 4, mask) >> (2 * (j // 4))) & 3
        dl = _f16(w_ptr, blk + Q3_K_D, mask) * ((sc_low | (sc_high << 4)) - 32).to(tl.float32)
        w = dl * (low - 4 * (1 - high)).to(tl.float32)
    elif FMT == Q4_K:
        blk = row_offset + (k // Q4_K_QK) * Q4_K_BYTES
        e = k % Q4_K_QK
        q = _nibble(_u8(w_ptr, blk + Q4_K_QS + 32 * (e // 64) + e % 32, mask), (e % 64) // 32)
        sc, m = _k_scale_min(w_ptr, blk + Q4_K_SCALES, e // 32, mask)
        w = (_f16(w_ptr, blk + Q4_K_D, mask) * sc) * q.to(tl.float32) - _f16(w_ptr, blk + Q4_K_DMIN, mask) * m
    elif FMT == Q5_K:
        blk = row_offset + (k // Q5_K_QK) * Q5_K_BYTES
        e = k % Q5_K_QK
        high = (_u8(w_ptr, blk + Q5_K_QH + e % 32, mask) >> (e // 32)) & 1
        q = _nibble(_u8(w_ptr, blk + Q5_K_QS + 32 * (e // 64) + e % 32, mask), (e % 64) // 32) | (high << 4)
        sc, m = _k_scale_min(w_ptr, blk + Q5_K_SCALES, e // 32, mask)
        w = (_f16(w_ptr, blk + Q5_K_D, mask) * sc) * q.to(tl.float32) - _f16(w_ptr, blk + Q5_K_DMIN, mask) * m
    elif FMT == Q6_K:
        blk = row_offset + (k // Q6_K_QK) * Q6_K_BYTES
        e = k % Q6_K_QK
        half = e // 128
        r = e % 128
        low = _nibble(_u8(w_ptr, blk + Q6_K_QL + 64 * half + r % 64, mask), r // 64)
        high = (_u8(w_ptr, blk + Q6_K_QH + 32 * half + r % 32, mask) >> (2 * (r // 32))) & 3
        sc = _i8(w_ptr, blk + Q6_K_SCALES + e // 16, mask)
        w = (_f16(w_ptr, blk + Q6_K_D, mask) * sc) * ((low | (high << 4)) - 32).to(tl.float32)
    elif FMT == IQ4_XS:
        blk = row_offset + (k // IQ4_XS_QK) * IQ4_XS_BYTES
        e = k % IQ4_XS_QK
        ib = e // 32
        ls_low = _nibble(_u8(w_ptr, blk + IQ4_XS_SCALES_L + ib // 2, mask), ib % 2)
        ls_high = (_u8(w_ptr, blk + IQ4_XS_SCALES_H + ib // 4, mask) >> (2 * (ib % 4))) & 3
        code = _nibble(_u8(w_ptr, blk + IQ4_XS_QS + 16 * ib + e % 16, mask), (e % 32) // 16)
        w = (_f16(w_ptr, blk + IQ4_XS_D, mask) * ((ls_low | (ls_high << 4)) - 32).to(tl.float32)) * _iq4_value(code)
    else:
        tl.static_assert(FMT == NF4, "decode_tile: unknown format id")
        blk = row_offset + (k // NF4_QK) * NF4_BYTES
        j = k % NF4_QK
        code = _nibble(_u8(w_ptr, blk + NF4_QS + j // 2, mask), 1 - j % 2)
        w = _nf4_value(code, tables_ptr) * _f32(w_ptr, blk + NF4_ABSMAX, mask)
    return w
