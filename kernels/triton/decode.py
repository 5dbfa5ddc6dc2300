"""Per-format "decode a tile" device functions: raw blocks -> float32 weights, element by element.

`decode_tile(w_ptr, row_offset, k, mask, FMT, nf4_table_ptr)` takes the weight's base pointer, the byte offsets of a
tile's rows (`[BLOCK_N, 1]`, int32: every Flux weight is far below 2 GB) and logical column indices (`[1, BLOCK_K]`)
and returns the `[BLOCK_N, BLOCK_K]` weights. Offsets stay 32-bit until each load: 64-bit pointer tiles would double
the registers the decode needs. Each branch reads the bytes an element needs straight
from the block layout written down in `kernels/reference/<family>.py` (the numpy twin it is tested against); scale
bytes are re-read per element and served from L1/L2. Format ids come from the registry (`FORMAT_IDS`), and the
`FMT` constexpr picks one branch at compile time.
"""

import triton
import triton.language as tl

from kernels.formats import FORMATS

FORMAT_IDS = {name: i for i, name in enumerate(FORMATS)}
KERNEL_FORMATS = tuple(name for name, f in FORMATS.items() if f.is_quantized)

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
    """kvalues_iq4nl[code] without a table load: a sum of selects over the 16 entries."""
    v = tl.where(code == 0, -127, 0)
    v += tl.where(code == 1, -104, 0) + tl.where(code == 2, -83, 0) + tl.where(code == 3, -65, 0)
    v += tl.where(code == 4, -49, 0) + tl.where(code == 5, -35, 0) + tl.where(code == 6, -22, 0)
    v += tl.where(code == 7, -10, 0) + tl.where(code == 8, 1, 0) + tl.where(code == 9, 13, 0)
    v += tl.where(code == 10, 25, 0) + tl.where(code == 11, 38, 0) + tl.where(code == 12, 53, 0)
    v += tl.where(code == 13, 69, 0) + tl.where(code == 14, 89, 0) + tl.where(code == 15, 113, 0)
    return v.to(tl.float32)


@triton.jit
def _nf4_value(code, table_ptr):
    return tl.load(table_ptr + code)


@triton.jit
def _k_scale_min(w_ptr, blk, j, mask):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block j from the 12 bytes at blk + 4 (ggml's get_scale_min_k4)."""
    s = blk + 4
    low = j < 4
    a = _u8(w_ptr, s + tl.where(low, j, j + 4), mask)
    b = _u8(w_ptr, s + tl.where(low, j + 4, j - 4), mask)
    c = _u8(w_ptr, s + j, mask)
    sc = tl.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
    m = tl.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def decode_tile(w_ptr, row_offset, k, mask, FMT: tl.constexpr, nf4_table_ptr):
    """Weights `[BLOCK_N, BLOCK_K]` float32 at row byte offsets `row_offset` and logical columns `k`."""
    if FMT == Q8_0:
        blk = row_offset + (k // 32) * 34
        w = _f16(w_ptr, blk, mask) * _i8(w_ptr, blk + 2 + k % 32, mask)
    elif FMT == Q4_0:
        blk = row_offset + (k // 32) * 18
        j = k % 32
        q = _nibble(_u8(w_ptr, blk + 2 + j % 16, mask), j // 16)
        w = (q - 8).to(tl.float32) * _f16(w_ptr, blk, mask)
    elif FMT == Q4_1:
        blk = row_offset + (k // 32) * 20
        j = k % 32
        q = _nibble(_u8(w_ptr, blk + 4 + j % 16, mask), j // 16)
        w = q.to(tl.float32) * _f16(w_ptr, blk, mask) + _f16(w_ptr, blk + 2, mask)
    elif FMT == Q5_0:
        blk = row_offset + (k // 32) * 22
        j = k % 32
        high = (_u8(w_ptr, blk + 2 + j // 8, mask) >> (j % 8)) & 1
        q = _nibble(_u8(w_ptr, blk + 6 + j % 16, mask), j // 16) | (high << 4)
        w = (q - 16).to(tl.float32) * _f16(w_ptr, blk, mask)
    elif FMT == Q5_1:
        blk = row_offset + (k // 32) * 24
        j = k % 32
        high = (_u8(w_ptr, blk + 4 + j // 8, mask) >> (j % 8)) & 1
        q = _nibble(_u8(w_ptr, blk + 8 + j % 16, mask), j // 16) | (high << 4)
        w = q.to(tl.float32) * _f16(w_ptr, blk, mask) + _f16(w_ptr, blk + 2, mask)
    elif FMT == IQ4_NL:
        blk = row_offset + (k // 32) * 18
        j = k % 32
        w = _f16(w_ptr, blk, mask) * _iq4_value(_nibble(_u8(w_ptr, blk + 2 + j % 16, mask), j // 16))
    elif FMT == Q2_K:
        blk = row_offset + (k // 256) * 84
        e = k % 256
        sc = _u8(w_ptr, blk + e // 16, mask)
        q = (_u8(w_ptr, blk + 16 + 32 * (e // 128) + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        dl = _f16(w_ptr, blk + 80, mask) * (sc & 15).to(tl.float32)
        ml = _f16(w_ptr, blk + 82, mask) * (sc >> 4).to(tl.float32)
        w = dl * q.to(tl.float32) - ml
    elif FMT == Q3_K:
        blk = row_offset + (k // 256) * 110
        e = k % 256
        j = e // 16
        high = (_u8(w_ptr, blk + e % 32, mask) >> (e // 32)) & 1
        low = (_u8(w_ptr, blk + 32 + 32 * (e // 128) + e % 32, mask) >> (2 * ((e % 128) // 32))) & 3
        sc_low = _nibble(_u8(w_ptr, blk + 96 + j % 8, mask), j // 8)
        sc_high = (_u8(w_ptr, blk + 104 + j % 4, mask) >> (2 * (j // 4))) & 3
        dl = _f16(w_ptr, blk + 108, mask) * ((sc_low | (sc_high << 4)) - 32).to(tl.float32)
        w = dl * (low - 4 * (1 - high)).to(tl.float32)
    elif FMT == Q4_K:
        blk = row_offset + (k // 256) * 144
        e = k % 256
        q = _nibble(_u8(w_ptr, blk + 16 + 32 * (e // 64) + e % 32, mask), (e % 64) // 32)
        sc, m = _k_scale_min(w_ptr, blk, e // 32, mask)
        w = (_f16(w_ptr, blk, mask) * sc) * q.to(tl.float32) - _f16(w_ptr, blk + 2, mask) * m
    elif FMT == Q5_K:
        blk = row_offset + (k // 256) * 176
        e = k % 256
        high = (_u8(w_ptr, blk + 16 + e % 32, mask) >> (e // 32)) & 1
        q = _nibble(_u8(w_ptr, blk + 48 + 32 * (e // 64) + e % 32, mask), (e % 64) // 32) | (high << 4)
        sc, m = _k_scale_min(w_ptr, blk, e // 32, mask)
        w = (_f16(w_ptr, blk, mask) * sc) * q.to(tl.float32) - _f16(w_ptr, blk + 2, mask) * m
    elif FMT == Q6_K:
        blk = row_offset + (k // 256) * 210
        e = k % 256
        half = e // 128
        r = e % 128
        low = _nibble(_u8(w_ptr, blk + 64 * half + r % 64, mask), r // 64)
        high = (_u8(w_ptr, blk + 128 + 32 * half + r % 32, mask) >> (2 * (r // 32))) & 3
        sc = _i8(w_ptr, blk + 192 + e // 16, mask)
        w = (_f16(w_ptr, blk + 208, mask) * sc) * ((low | (high << 4)) - 32).to(tl.float32)
    elif FMT == IQ4_XS:
        blk = row_offset + (k // 256) * 136
        e = k % 256
        ib = e // 32
        ls = _nibble(_u8(w_ptr, blk + 4 + ib // 2, mask), ib % 2) | (((_u8(w_ptr, blk + 2 + ib // 4, mask) >> (2 * (ib % 4))) & 3) << 4)
        code = _nibble(_u8(w_ptr, blk + 8 + 16 * ib + e % 16, mask), (e % 32) // 16)
        w = (_f16(w_ptr, blk, mask) * (ls - 32).to(tl.float32)) * _iq4_value(code)
    else:
        tl.static_assert(FMT == NF4, "decode_tile: unknown format id")
        blk = row_offset + (k // 64) * 36
        j = k % 64
        code = _nibble(_u8(w_ptr, blk + 4 + j // 2, mask), 1 - j % 2)
        w = _nf4_value(code, nf4_table_ptr) * _f32(w_ptr, blk, mask)
    return w
