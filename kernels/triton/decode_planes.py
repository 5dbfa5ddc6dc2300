"""Per-format "decode a tile" device functions for the planes layout (`kernels/repack.py`).

`decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, BLOCK_N, BLOCK_K)` returns the float32 weights
`[BLOCK_N, BLOCK_K]` of columns `k0 .. k0 + BLOCK_K` of the rows at byte offsets `rows` (`[BLOCK_N, 1]`). `k0` is a
multiple of BLOCK_K, and where BLOCK_K spans several blocks it is a multiple of the block size.

What the layout buys over `decode.decode_tile`, per tile rather than per element:
- codes are contiguous loads of planes in element order: bytes and 32-bit words, turned into floats a register at
  a time by byte permutes (`float_bits`: the mantissa trick, OR the value into 2^23's bit pattern and subtract
  2^23, no I2F), or 2-bit fields split by `tl.join`;
- each block's scale (and min) is one typed load per block, spread over its elements; the K-quants' packed 6-bit
  sub-block scales are decoded once per sub-block, not per element;
- no division or modulo by the block size per element.
"""

import triton
import triton.language as tl

from kernels.repack import PLANE_ALIGN as _PLANE_ALIGN
from kernels.triton.decode import (FORMAT_IDS, IQ4_NL, IQ4_XS, NF4, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
                                   Q6_K, Q8_0)
from kernels.triton.float_bits import (five_bit_float_bits, float_form, int8_float_bits, nf4_bf16, nf4_values,
                                       nibble_float_bits, three_bit_float_bits)

PLANE_ALIGN = tl.constexpr(_PLANE_ALIGN)
TWO_POW_23 = tl.constexpr(8388608.0)


@triton.jit
def _plane_bytes(nb, size: tl.constexpr):
    return tl.multiple_of((nb * size + PLANE_ALIGN - 1) // PLANE_ALIGN * PLANE_ALIGN, 16)


@triton.jit
def _bits_to_float(bits, offset: tl.constexpr):
    """The float32 of `bits` (2^23 + v, v < 2^23 an integer) less 2^23 + offset: `v - offset`, exact."""
    return bits.to(tl.float32, bitcast=True) - (TWO_POW_23 + offset)


@triton.jit
def _typed(w_ptr, base, index, mask, dtype: tl.constexpr):
    """Aligned loads of the `dtype` fields `index` of the plane at byte offset `base` (planes are 16-byte aligned,
    fields naturally aligned within them). Indexed in `dtype`'s elements, not bytes, so the compiler sees fields
    side by side as contiguous and loads them 128 bits at a time."""
    return tl.load((w_ptr + base).to(tl.pointer_type(dtype)) + index, mask=mask, other=0)


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
def _nibble_bytes(w_ptr, plane, k0, K, n_mask, BLOCK_K: tl.constexpr):
    """The bytes `[BLOCK_N, BLOCK_K // 2]` of the tile's 4-bit codes, two a byte, the first in the low nibble."""
    j = (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
    return tl.load(w_ptr + plane + j, mask=n_mask & (j < K // 2), other=0)


@triton.jit
def _interleave(low, high, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The values of the low and the high nibbles back in element order."""
    return tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))


@triton.jit
def _code_bits(w_ptr, plane, k0, K, n_mask, BITS: tl.constexpr, IQ4: tl.constexpr, tables_ptr, HALF: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tile's codes `[BLOCK_N, BLOCK_K]` as int32 bits of the float32 2^23 + v (`HALF`: 0.5 + v / 256;
    `float_bits`), from a plane of int8 codes (`BITS` 8, v = code + 128) or of 4-bit codes (v = code, or with `IQ4`
    kvalues_iq4nl[code] + 128)."""
    if BITS == 8:
        tl.static_assert(not HALF, "int8 codes + 128 reach 255: no half form")
        k = (k0 + tl.arange(0, BLOCK_K))[None, :]
        return int8_float_bits(tl.load(w_ptr + plane + k, mask=n_mask & (k < K), other=0))
    else:
        tl.static_assert(BITS == 4, "_code_bits: 8- or 4-bit codes")
        low, high = nibble_float_bits(_nibble_bytes(w_ptr, plane, k0, K, n_mask, BLOCK_K), IQ4, tables_ptr, HALF)
        return _interleave(low, high, BLOCK_N, BLOCK_K)


@triton.jit
def _two_bit_codes(w_ptr, plane, k0, K, n_mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tile's codes as int32 `[BLOCK_N, BLOCK_K]` from a plane of 2-bit codes in element order, 4 a byte, the
    first in the lowest bits."""
    j = (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    b = tl.load(w_ptr + plane + j, mask=n_mask & (j < K // 4), other=0).to(tl.int32)
    # tl.join stacks on a new last axis, so join(join(f0, f2), join(f1, f3)) lays fields out as f0 f1 f2 f3
    return tl.reshape(tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6)), (BLOCK_N, BLOCK_K))


@triton.jit
def _scale_bytes(w_ptr, plane, t, size: tl.constexpr, per_block: tl.constexpr, byte, mask):
    """Byte `byte` (a `[1, sub-blocks]` index) of the `size`-byte scales of the block holding each sub-block `t`."""
    return tl.load(w_ptr + plane + size * (t // per_block) + byte, mask=mask, other=0).to(tl.int32)


@triton.jit
def _k_quant_d(w_ptr, plane, t, per_block: tl.constexpr, mask):
    """The f16 super-block scale (or min) of each sub-block `t`, as float32. Addressed in bytes: indexed in f16
    elements (and Q6_K's int8 scales likewise), Q6_K's 16-deep GEMM tile spilled 16 bytes on sm_80-89."""
    return _typed(w_ptr, plane + 2 * (t // per_block), 0, mask, tl.float16).to(tl.float32)


@triton.jit
def _five_bit_code_bits(w_ptr, low_plane, fifth_plane, k0, K, n_mask, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Q5_0, Q5_1, Q5_K: the tile's 5-bit codes as int32 bits of the float32 2^23 + code (`HALF`: 0.5 + code /
    256), 8 elements at a time: a
    32-bit word of a plane of 4-bit codes and a byte of a plane of fifth bits (bit e of byte m: element 8m + e,
    as Q5_0's and Q5_1's little-endian u32 per block has them too)."""
    m = (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    m_mask = n_mask & (m < K // 8)
    bits = five_bit_float_bits(_typed(w_ptr, low_plane, m, m_mask, tl.int32),
                               tl.load(w_ptr + fifth_plane + m, mask=m_mask, other=0).to(tl.int32), HALF)
    return tl.reshape(bits, (BLOCK_N, BLOCK_K))


_FORMAT_NAMES = {i: name for name, i in FORMAT_IDS.items()}


@triton.constexpr_function
def sub_block_size(fmt: int) -> int:
    """Elements sharing one scale (and offset) in `decode_planes_parts`."""
    return {"NF4": 64, "Q6_K": 16, "Q3_K": 16, "Q2_K": 16}.get(_FORMAT_NAMES[fmt], 32)


@triton.constexpr_function
def has_offset(fmt: int) -> bool:
    """Whether `decode_planes_parts` gives `fmt` an offset: Q4_1's and Q5_1's min, the K-quants' -min."""
    return _FORMAT_NAMES[fmt] in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")


@triton.constexpr_function
def code_offset(fmt: int) -> int:
    """What `fmt` subtracts from a stored code (as `float_bits` gives it) to get its value."""
    return {"Q8_0": 128, "IQ4_NL": 128, "IQ4_XS": 128, "Q4_0": 8, "Q5_0": 16, "Q6_K": 32, "Q3_K": 4}.get(
        _FORMAT_NAMES[fmt], 0)


@triton.constexpr_function
def has_half_form(fmt: int) -> bool:
    """Whether every stored code of `fmt` is below 128, so `decode_planes_parts` can give it in the half form."""
    return _FORMAT_NAMES[fmt] in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@triton.jit
def _code_value(bits, FMT: tl.constexpr, HALF: tl.constexpr):
    if HALF:
        v = bits.to(tl.float32, bitcast=True)
    else:
        v = _bits_to_float(bits, code_offset(FMT))
    return v


@triton.jit
def decode_planes_parts(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, tables_ptr, HALF: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(v, scale, offset): the tile's weights are `v * scale + offset`, v `[BLOCK_N, BLOCK_K]` per element, scale and
    offset `[BLOCK_N, sub-blocks]` per sub-block of `sub_block_size(FMT)` elements (offset only where
    `has_offset(FMT)`; elsewhere it is the scale again, unused). With `HALF` (where `has_half_form(FMT)`) v is
    instead 0.5 + (v + code_offset(FMT)) / 256, the stored code in the half form (`float_bits`)."""
    if FMT == NF4:
        nb = K // 64
        b, b_mask = _blocks(k0, K, n_mask, 64, BLOCK_K)
        scale = _typed(w_ptr, rows, b, b_mask, tl.float32)
        low, high = nf4_values(_nibble_bytes(w_ptr, rows + _plane_bytes(nb, 4), k0, K, n_mask, BLOCK_K), tables_ptr)
        v = _interleave(low, high, BLOCK_N, BLOCK_K)
        offset = scale
    elif (FMT == Q6_K) | (FMT == Q3_K) | (FMT == Q2_K):
        # 16-element sub-blocks; the planes follow the block's fields (kernels/repack.py)
        nb = K // 256
        t, t_mask = _blocks(k0, K, n_mask, 16, BLOCK_K)
        if FMT == Q6_K:  # ql: low 4 bits | qh: top 2 bits | int8 scales | d
            high_plane = _plane_bytes(nb, 128)
            scale_plane = high_plane + _plane_bytes(nb, 64)
            scale = _k_quant_d(w_ptr, rows + scale_plane + _plane_bytes(nb, 16), t, 16, t_mask) * \
                _typed(w_ptr, rows + scale_plane + t, 0, t_mask, tl.int8).to(tl.float32)
            top = _two_bit_codes(w_ptr, rows + high_plane, k0, K, n_mask, BLOCK_N, BLOCK_K)
            if HALF:  # above the low 4 bits, in either form
                top = top << 20
            else:
                top = top << 4
            v = _code_value(_code_bits(w_ptr, rows, k0, K, n_mask, 4, False, tables_ptr, HALF, BLOCK_N, BLOCK_K) | top,
                            FMT, HALF)
            offset = scale
        elif FMT == Q3_K:  # hmask: third bits | qs: low 2 bits | 12 bytes of 6-bit scales | d
            low_plane = _plane_bytes(nb, 32)
            scale_plane = low_plane + _plane_bytes(nb, 64)
            j = t % 16  # low 4 bits: nibble j // 8 of byte j % 8; top 2: bits 2 (j // 4) of byte 8 + j % 4
            low4 = (_scale_bytes(w_ptr, rows + scale_plane, t, 12, 16, j % 8, t_mask) >> (4 * (j // 8))) & 15
            top2 = (_scale_bytes(w_ptr, rows + scale_plane, t, 12, 16, 8 + j % 4, t_mask) >> (2 * (j // 4))) & 3
            scale = _k_quant_d(w_ptr, rows + scale_plane + _plane_bytes(nb, 12), t, 16, t_mask) * \
                ((low4 | (top2 << 4)) - 32).to(tl.float32)
            # 16 elements at a time: a 32-bit word of low bits and a 16-bit word of third bits
            m = (k0 // 16 + tl.arange(0, BLOCK_K // 16))[None, :]
            m_mask = n_mask & (m < K // 16)
            bits = three_bit_float_bits(_typed(w_ptr, rows + low_plane, m, m_mask, tl.int32),
                                        _typed(w_ptr, rows, m, m_mask, tl.uint16).to(tl.int32), HALF)
            v = _code_value(tl.reshape(bits, (BLOCK_N, BLOCK_K)), FMT, HALF)
            offset = scale
        else:  # Q2_K: scales (a byte each: scale | min << 4) | qs: 2-bit codes | d | dmin
            codes_plane = _plane_bytes(nb, 16)
            d_plane = codes_plane + _plane_bytes(nb, 64)
            packed = _scale_bytes(w_ptr, rows, t, 16, 16, t % 16, t_mask)
            scale = _k_quant_d(w_ptr, rows + d_plane, t, 16, t_mask) * (packed & 15).to(tl.float32)
            offset = -(_k_quant_d(w_ptr, rows + d_plane + _plane_bytes(nb, 2), t, 16, t_mask) *
                       (packed >> 4).to(tl.float32))
            v = _code_value(float_form(_two_bit_codes(w_ptr, rows + codes_plane, k0, K, n_mask, BLOCK_N, BLOCK_K),
                                       HALF), FMT, HALF)
    elif (FMT == Q4_K) | (FMT == Q5_K):
        # 32-element sub-blocks: d | dmin | 12 bytes of 6-bit scales and mins | (Q5_K: qh, fifth bits) | qs
        nb = K // 256
        t, t_mask = _blocks(k0, K, n_mask, 32, BLOCK_K)
        dmin_plane = _plane_bytes(nb, 2)
        scale_plane = dmin_plane + _plane_bytes(nb, 2)
        codes_plane = scale_plane + _plane_bytes(nb, 12)
        # ggml's get_scale_min_k4: sub-blocks 0-3 in bits 0-5 of bytes j (scale) and 4 + j (min); 4-7 in the
        # nibbles of byte 4 + j, topped by bits 6-7 of bytes j - 4 and j
        j = t % 8
        a = _scale_bytes(w_ptr, rows + scale_plane, t, 12, 8, j % 4, t_mask)
        c = _scale_bytes(w_ptr, rows + scale_plane, t, 12, 8, 4 + j % 4, t_mask)
        e = _scale_bytes(w_ptr, rows + scale_plane, t, 12, 8, 8 + j % 4, t_mask)
        sc = tl.where(j < 4, a & 63, (e & 15) | ((a >> 6) << 4))
        mn = tl.where(j < 4, c & 63, (e >> 4) | ((c >> 6) << 4))
        scale = _k_quant_d(w_ptr, rows, t, 8, t_mask) * sc.to(tl.float32)
        offset = -(_k_quant_d(w_ptr, rows + dmin_plane, t, 8, t_mask) * mn.to(tl.float32))
        if FMT == Q4_K:
            bits = _code_bits(w_ptr, rows + codes_plane, k0, K, n_mask, 4, False, tables_ptr, HALF, BLOCK_N, BLOCK_K)
        else:
            bits = _five_bit_code_bits(w_ptr, rows + codes_plane + _plane_bytes(nb, 32), rows + codes_plane, k0, K,
                                       n_mask, HALF, BLOCK_N, BLOCK_K)
        v = _code_value(bits, FMT, HALF)
    elif FMT == IQ4_XS:
        # 32-element sub-blocks: d | scales_h (2 bits a sub-block) | scales_l (4 bits a sub-block) | qs
        nb = K // 256
        t, t_mask = _blocks(k0, K, n_mask, 32, BLOCK_K)
        low_plane = 2 * _plane_bytes(nb, 2)
        j = t % 8
        low4 = (_scale_bytes(w_ptr, rows + low_plane, t, 4, 8, j // 2, t_mask) >> (4 * (j % 2))) & 15
        top2 = (_scale_bytes(w_ptr, rows + _plane_bytes(nb, 2), t, 2, 8, j // 4, t_mask) >> (2 * (j % 4))) & 3
        scale = _k_quant_d(w_ptr, rows, t, 8, t_mask) * ((low4 | (top2 << 4)) - 32).to(tl.float32)
        bits = _code_bits(w_ptr, rows + low_plane + _plane_bytes(nb, 4), k0, K, n_mask, 4, True, tables_ptr, HALF,
                          BLOCK_N, BLOCK_K)
        v = _code_value(bits, FMT, HALF)
        offset = scale
    else:
        tl.static_assert((FMT == Q8_0) | (FMT == Q4_0) | (FMT == Q4_1) | (FMT == Q5_0) | (FMT == Q5_1)
                         | (FMT == IQ4_NL), "decode_planes_tile: format without a planes layout")
        # every other planes format: 32-element blocks, an f16 scale `d` first (and Q4_1's, Q5_1's min `m`)
        nb = K // 32
        d_plane = _plane_bytes(nb, 2)
        b, b_mask = _blocks(k0, K, n_mask, 32, BLOCK_K)
        scale = _typed(w_ptr, rows, b, b_mask, tl.float16).to(tl.float32)
        offset = scale
        codes_plane = d_plane
        if (FMT == Q4_1) | (FMT == Q5_1):
            offset = _typed(w_ptr, rows + d_plane, b, b_mask, tl.float16).to(tl.float32)
            codes_plane = 2 * d_plane
        if (FMT == Q5_0) | (FMT == Q5_1):
            bits = _five_bit_code_bits(w_ptr, rows + codes_plane + _plane_bytes(nb, 4), rows + codes_plane, k0, K,
                                       n_mask, HALF, BLOCK_N, BLOCK_K)
        else:
            bits = _code_bits(w_ptr, rows + codes_plane, k0, K, n_mask, 8 if FMT == Q8_0 else 4, FMT == IQ4_NL,
                              tables_ptr, HALF, BLOCK_N, BLOCK_K)
        v = _code_value(bits, FMT, HALF)
    return v, scale, offset


@triton.jit
def decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, tables_ptr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    v, scale, offset = decode_planes_parts(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, False, BLOCK_N, BLOCK_K)
    w = v * _expand(scale, BLOCK_N, BLOCK_K, sub_block_size(FMT))
    if has_offset(FMT):
        w += _expand(offset, BLOCK_N, BLOCK_K, sub_block_size(FMT))
    return w


@triton.jit
def decode_planes_tile_as(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, tables_ptr, DTYPE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`decode_planes_tile(...).to(DTYPE)`. NF4 to bf16 in tiles at least a block deep goes 16 elements of a block at
    a time (`float_bits.nf4_bf16`): on NVIDIA GPUs the block's 16 possible weights are rounded to bf16 once per call
    and each element looks its weight up in them, which saves a multiply and a conversion an element, and looks up
    two byte tables where float32 values take four and a byte transpose (sm_90 GEMM, 128x128x128: 9.9 -> 8.0
    instructions a decoded element). In shallower tiles the 16 outputs of a call regroup through shared memory
    (19.9 -> 34.9), so those decode to float32 first, as every other case does."""
    if (FMT == NF4) and (DTYPE == tl.bfloat16) and (BLOCK_K >= 64):
        nb = K // 64
        b, b_mask = _blocks(k0, K, n_mask, 64, BLOCK_K)
        m = (k0 // 16 + tl.arange(0, BLOCK_K // 16))[None, :]
        codes = _typed(w_ptr, rows + _plane_bytes(nb, 4), m, n_mask & (m < K // 16), tl.int64)
        scale = _expand(_typed(w_ptr, rows, b, b_mask, tl.float32), BLOCK_N, BLOCK_K // 16, 4)
        w = tl.reshape(nf4_bf16(codes, scale, tables_ptr), (BLOCK_N, BLOCK_K))
    else:
        w = decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, BLOCK_N, BLOCK_K).to(DTYPE)
    return w
