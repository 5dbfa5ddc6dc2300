"""Per-format "decode a tile" device functions for the planes layout (`kernels/repack.py`).

`decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT, nf4_table_ptr, BLOCK_N, BLOCK_K)` returns the float32 weights
`[BLOCK_N, BLOCK_K]` of columns `k0 .. k0 + BLOCK_K` of the rows at byte offsets `rows` (`[BLOCK_N, 1]`). `k0` is a
multiple of BLOCK_K, and where BLOCK_K spans several blocks it is a multiple of the block size.

What the layout buys over `decode.decode_tile`, per tile rather than per element:
- codes are one contiguous load (int8, or bytes of two 4-bit codes in element order, split by `tl.join`);
- each block's scale (and min, and Q5's 32 fifth bits) is one typed load per block, spread over its elements;
- integers become floats by the mantissa trick (OR the value into 2^23's bit pattern, subtract 2^23), no I2F;
- no division or modulo by the block size per element.
"""

import triton
import triton.language as tl

from kernels.repack import PLANE_ALIGN as _PLANE_ALIGN
from kernels.triton.decode import IQ4_NL, NF4, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q8_0, _iq4_value

PLANE_ALIGN = tl.constexpr(_PLANE_ALIGN)
TWO_POW_23 = tl.constexpr(8388608.0)
FLOAT_OF_TWO_POW_23 = tl.constexpr(0x4B000000)  # 2^23's float32 bits: OR a value < 2^23 in, it lands in the mantissa


@triton.jit
def _plane_bytes(nb, size: tl.constexpr):
    return tl.multiple_of((nb * size + PLANE_ALIGN - 1) // PLANE_ALIGN * PLANE_ALIGN, 16)


@triton.jit
def _exact_float(q, offset: tl.constexpr):
    """`q - offset` as float32 for integers 0 <= q < 2^23 (exact)."""
    return (q | FLOAT_OF_TWO_POW_23).to(tl.float32, bitcast=True) - (TWO_POW_23 + offset)


@triton.jit
def _typed(w_ptr, offset, mask, dtype: tl.constexpr):
    """One aligned load of a `dtype` field (planes are 16-byte aligned, fields naturally aligned within them)."""
    return tl.load((w_ptr + offset).to(tl.pointer_type(dtype)), mask=mask, other=0)


@triton.jit
def _expand(per_block, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QK: tl.constexpr):
    """`[BLOCK_N, blocks]` values of the blocks a tile spans -> `[BLOCK_N, BLOCK_K]`, one per element."""
    if BLOCK_K >= QK:
        return tl.reshape(tl.broadcast_to(per_block[:, :, None], (BLOCK_N, BLOCK_K // QK, QK)), (BLOCK_N, BLOCK_K))
    else:
        return tl.broadcast_to(per_block, (BLOCK_N, BLOCK_K))


@triton.jit
def _blocks(k0, K, n_mask, QK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Indices `[1, blocks]` of the blocks a tile spans and their mask."""
    NB: tl.constexpr = BLOCK_K // QK if BLOCK_K >= QK else 1
    b = (k0 // QK + tl.arange(0, NB))[None, :]
    return b, n_mask & (b < K // QK)


@triton.jit
def _codes(w_ptr, plane, k0, K, n_mask, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tile's codes as int32 `[BLOCK_N, BLOCK_K]`: a byte each, or two 4-bit codes a byte (low nibble first)."""
    if PAIRS:
        j = (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
        pairs = tl.load(w_ptr + plane + j, mask=n_mask & (j < K // 2), other=0).to(tl.int32)
        return tl.reshape(tl.join(pairs & 15, pairs >> 4), (BLOCK_N, BLOCK_K))
    else:
        k = (k0 + tl.arange(0, BLOCK_K))[None, :]
        return tl.load(w_ptr + plane + k, mask=n_mask & (k < K), other=0).to(tl.int32)


@triton.jit
def _two_bits(w_ptr, plane, k0, K, n_mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q6_K's high 2 bits of each code as int32 `[BLOCK_N, BLOCK_K]`, four a byte (element 4j in bits 0-1)."""
    j = (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    quads = tl.load(w_ptr + plane + j, mask=n_mask & (j < K // 4), other=0).to(tl.int32)
    # join(join(a, c), join(b, d)) lays the four out as a, b, c, d
    pairs = tl.join(tl.join(quads & 3, (quads >> 4) & 3), tl.join((quads >> 2) & 3, quads >> 6))
    return tl.reshape(pairs, (BLOCK_N, BLOCK_K))


@triton.jit
def _fifth_bits(w_ptr, plane, k0, b, b_mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q5_0/Q5_1: bit 4 of each code, from its block's little-endian u32 (bit e = element e), as 0 or 16."""
    qh = _expand(_typed(w_ptr, plane + 4 * b, b_mask, tl.uint32).to(tl.int32, bitcast=True), BLOCK_N, BLOCK_K, 32)
    e = tl.arange(0, BLOCK_K) % 32 if BLOCK_K >= 32 else k0 % 32 + tl.arange(0, BLOCK_K)
    return ((qh >> e[None, :]) & 1) << 4


@triton.jit
def decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, nf4_table_ptr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    if FMT == NF4:
        nb = K // 64
        b, b_mask = _blocks(k0, K, n_mask, 64, BLOCK_K)
        absmax = _expand(_typed(w_ptr, rows + 4 * b, b_mask, tl.float32), BLOCK_N, BLOCK_K, 64)
        code = _codes(w_ptr, rows + _plane_bytes(nb, 4), k0, K, n_mask, True, BLOCK_N, BLOCK_K)
        w = tl.load(nf4_table_ptr + code) * absmax
    elif FMT == Q6_K:
        # planes: low 4 bits (128 bytes a block), high 2 bits (64), int8 scales (16, one per 16 elements), f16 d
        nb = K // 256
        high_plane = _plane_bytes(nb, 128)
        scale_plane = high_plane + _plane_bytes(nb, 64)
        d_plane = scale_plane + _plane_bytes(nb, 16)
        s, s_mask = _blocks(k0, K, n_mask, 16, BLOCK_K)
        b, b_mask = _blocks(k0, K, n_mask, 256, BLOCK_K)
        d = _typed(w_ptr, rows + d_plane + 2 * b, b_mask, tl.float16).to(tl.float32)
        if BLOCK_K >= 256:
            d = _expand(d, BLOCK_N, BLOCK_K // 16, 16)  # one per 16-element scale
        scale = d * _typed(w_ptr, rows + scale_plane + s, s_mask, tl.int8).to(tl.float32)
        q = _codes(w_ptr, rows, k0, K, n_mask, True, BLOCK_N, BLOCK_K) | \
            (_two_bits(w_ptr, rows + high_plane, k0, K, n_mask, BLOCK_N, BLOCK_K) << 4)
        w = _exact_float(q, 32) * _expand(scale, BLOCK_N, BLOCK_K, 16)
    else:
        tl.static_assert((FMT == Q8_0) | (FMT == Q4_0) | (FMT == Q4_1) | (FMT == Q5_0) | (FMT == Q5_1)
                         | (FMT == IQ4_NL), "decode_planes_tile: format without a planes layout")
        # every other planes format: 32-element blocks, an f16 scale `d` first
        nb = K // 32
        d_plane = _plane_bytes(nb, 2)
        b, b_mask = _blocks(k0, K, n_mask, 32, BLOCK_K)
        d = _expand(_typed(w_ptr, rows + 2 * b, b_mask, tl.float16).to(tl.float32), BLOCK_N, BLOCK_K, 32)
        if FMT == Q8_0:
            q = _codes(w_ptr, rows + d_plane, k0, K, n_mask, False, BLOCK_N, BLOCK_K)
            w = _exact_float(q ^ 128, 128) * d  # int8 bits -> offset binary -> value
        elif FMT == Q4_0:
            q = _codes(w_ptr, rows + d_plane, k0, K, n_mask, True, BLOCK_N, BLOCK_K)
            w = _exact_float(q, 8) * d
        elif FMT == IQ4_NL:
            q = _codes(w_ptr, rows + d_plane, k0, K, n_mask, True, BLOCK_N, BLOCK_K)
            w = d * _iq4_value(q)
        elif FMT == Q4_1:
            m = _expand(_typed(w_ptr, rows + d_plane + 2 * b, b_mask, tl.float16).to(tl.float32), BLOCK_N, BLOCK_K,
                        32)
            q = _codes(w_ptr, rows + 2 * d_plane, k0, K, n_mask, True, BLOCK_N, BLOCK_K)
            w = _exact_float(q, 0) * d + m
        elif FMT == Q5_0:
            high = _fifth_bits(w_ptr, rows + d_plane, k0, b, b_mask, BLOCK_N, BLOCK_K)
            q = _codes(w_ptr, rows + d_plane + _plane_bytes(nb, 4), k0, K, n_mask, True, BLOCK_N, BLOCK_K)
            w = _exact_float(q | high, 16) * d
        else:
            m = _expand(_typed(w_ptr, rows + d_plane + 2 * b, b_mask, tl.float16).to(tl.float32), BLOCK_N, BLOCK_K,
                        32)
            high = _fifth_bits(w_ptr, rows + 2 * d_plane, k0, b, b_mask, BLOCK_N, BLOCK_K)
            q = _codes(w_ptr, rows + 2 * d_plane + _plane_bytes(nb, 4), k0, K, n_mask, True, BLOCK_N, BLOCK_K)
            w = _exact_float(q | high, 0) * d + m
    return w
