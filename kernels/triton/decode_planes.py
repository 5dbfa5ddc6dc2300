"""Per-format "decode a tile" device functions for the planes layout (`kernels/repack.py`).

`decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, BLOCK_N, BLOCK_K)` returns the float32 weights
`[BLOCK_N, BLOCK_K]` of columns `k0 .. k0 + BLOCK_K` of the rows at byte offsets `rows` (`[BLOCK_N, 1]`). `k0` is a
multiple of BLOCK_K, and where BLOCK_K spans several blocks it is a multiple of the block size. `n_mask` marks the
rows that exist; None says the whole tile lies inside the weight (every row exists and k0 + BLOCK_K <= K), and then
no load is masked: the masks' compares and the zeroing of masked lanes cost about 0.2-0.6 instructions an element
in the FMA GEMV (sm_90).

What the layout buys over `decode.decode_tile`, per tile rather than per element:
- codes are contiguous loads of planes in element order, 32-bit words turned into floats an asm call at a time by
  byte permutes (`float_bits`: the mantissa trick, OR the value into 2^23's bit pattern and subtract 2^23, no I2F;
  `FUSED_BYTES`: 4-bit codes four bytes a register);
- each block's scale (and min) is one typed load per block, spread over its elements; the K-quants' packed 6-bit
  sub-block scales are decoded once per sub-block, not per element;
- no division or modulo by the block size per element.
"""

import triton
import triton.language as tl

from kernels.repack import PLANE_ALIGN as _PLANE_ALIGN
from kernels.triton.decode import (FORMAT_IDS, IQ4_NL, IQ4_XS, NF4, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
                                   Q6_K, Q8_0)
from kernels.triton.float_bits import (Q3_K_SCALE_SHIFTS_AT, byte_float_bits, code_book_bf16, five_bit_float_bits,
                                       int8_float_bits, iq4_half_weights, nf4_half_levels, nf4_values,
                                       nibble_float_bits, shift_right, six_bit_float_bits, three_bit_float_bits,
                                       three_bit_ints, int_scale_pairs, two_bit_float_bits, two_bit_ints, bf16_halves)

PLANE_ALIGN = tl.constexpr(_PLANE_ALIGN)
TWO_POW_23 = tl.constexpr(8388608.0)
# `decode_planes_tile`'s FORM: how a tile's weights are decoded
EXACT = tl.constexpr(0)  # the reference's float32 weights bit for bit (the dequantize kernel)
FUSED = tl.constexpr(1)  # one multiply-add of the 128 form where the codes have it (the fused kernels)
# FUSED with 4-bit codes four bytes a register (an asm call each) rather than a 32-bit word of 8: on the mma.sync
# GPUs (sm_80-89) Triton then moves the codes' bytes, not the decoded tile, into the tensor-core operand's register
# layout, which counts fewer there (split-K per element, sm_80: Q4_0 5.19 -> 4.49, Q4_K 5.69 -> 4.96) and more on
# Hopper's wgmma (sm_90: 3.68 -> 4.22, 4.14 -> 4.57)
FUSED_BYTES = tl.constexpr(2)


@triton.jit
def _plane_bytes(nb, size: tl.constexpr):
    return tl.multiple_of((nb * size + PLANE_ALIGN - 1) // PLANE_ALIGN * PLANE_ALIGN, 16)


@triton.constexpr_function
def _log2(n: int) -> int:
    assert n & (n - 1) == 0, "a power of two"
    return n.bit_length() - 1


@triton.jit
def _first(k0, PER: tl.constexpr):
    """k0 // PER for a tile's first column k0 (>= 0) and a power of two PER: a shift, where // of the signed k0
    took a shift, a sign correction and an add (the compiler cannot know k0 >= 0; told so by tl.assume, ptxas
    allocated the tensor-core kernels' registers into spills)."""
    return k0 >> _log2(PER)


@triton.jit
def _bits_to_float(bits, offset: tl.constexpr):
    """The float32 of `bits` (2^23 + v, v < 2^23 an integer) less 2^23 + offset: `v - offset`, exact."""
    return bits.to(tl.float32, bitcast=True) - (TWO_POW_23 + offset)


@triton.jit
def _load(pointer, mask):
    """tl.load, masked (zeros outside) unless `mask` is None."""
    if mask is None:
        return tl.load(pointer)
    else:
        return tl.load(pointer, mask=mask, other=0)


@triton.jit
def _within(n_mask, index, count):
    """The mask of loads at `index` (< count to exist) in the rows of `n_mask`; None where `n_mask` is."""
    if n_mask is None:
        return None
    else:
        return n_mask & (index < count)


@triton.jit
def _typed(w_ptr, base, index, mask, dtype: tl.constexpr):
    """Aligned loads of the `dtype` fields `index` of the plane at byte offset `base` (planes are 16-byte aligned,
    fields naturally aligned within them). Indexed in `dtype`'s elements, not bytes, so the compiler sees fields
    side by side as contiguous and loads them 128 bits at a time."""
    return _load((w_ptr + base).to(tl.pointer_type(dtype)) + index, mask)


@triton.jit
def _by_fours(w_ptr, base, index, n_mask, count, dtype: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr):
    """`_typed` fields `index` (`[1, C]`, consecutive; < count to exist), loaded as `[BLOCK_N, C / 4, 4]`: four a
    load. Q5's fifth-bit bytes, one a 32-bit word of 4-bit codes, loaded as one `[BLOCK_N, C]` tile, were
    vectorised 16 a thread, which set the whole tile's register layout to a row a thread and quadrupled x's
    shared-memory loads in the FMA GEMV (sm_90, per element: Q5_K 5.11 -> 4.68, Q5_1 4.68 -> 4.34). Q3_K's 16-bit
    third bits count more so (5.33 -> 5.45): its 16-element asm calls set the layout there."""
    G: tl.constexpr = 4 if C >= 4 else C
    index = tl.reshape(index, (1, C // G, G))
    if n_mask is None:
        mask = None
    else:
        mask = n_mask[:, :, None] & (index < count)
    return tl.reshape(_load((w_ptr + base).to(tl.pointer_type(dtype))[:, :, None] + index, mask), (BLOCK_N, C))


@triton.jit
def _in_operand_rows(w_ptr, base, index, mask, dtype: tl.constexpr):
    """`_typed` fields `index` (`[1, C]`, consecutive, C a multiple of 4; `mask` `[R, C]`, `[R, 1]` or None) of the
    rows at `base` (`[R, 1]`, R a multiple of 16), loaded so that each thread holds the fields of the rows and of the
    quarter of C the tensor cores' operand gives it (`in_operand_order`): row 16 w + 8 r + l with l at lanes 2-4, w
    at the warps, r in registers, the quarters at lanes 0-1. Triton lays loads out by their shape, so the rows load
    as `[2 (r), R / 16 (w), 8 (l), 4, C / 4]`."""
    R: tl.constexpr = base.shape[0]
    C: tl.constexpr = index.shape[1]
    if C == 4:
        # one field a thread and row: a select the compiler cannot fold hides the fields' contiguity, so that Triton
        # does not vectorise the load over two lanes' fields
        index = tl.where(index >= 0, index, 0)
    rows = tl.permute(tl.reshape(base, (R // 16, 2, 8)), (1, 0, 2))[:, :, :, None, None]
    pointers = (w_ptr + rows).to(tl.pointer_type(dtype)) + tl.reshape(index, (1, 1, 1, 4, C // 4))
    if mask is None:
        fields = tl.load(pointers)
    else:
        mask = tl.reshape(tl.broadcast_to(mask, (R, C)), (R // 16, 2, 8, 4, C // 4))
        fields = tl.load(pointers, mask=tl.permute(mask, (1, 0, 2, 3, 4)), other=0)
    return tl.reshape(tl.permute(fields, (1, 0, 2, 3, 4)), (R, C))


@triton.jit
def in_operand_order(v, PER_WORD: tl.constexpr):
    """`[R, C]`: a tile of words of `PER_WORD` elements each (C a multiple of 4 PER_WORD, 128 or 64 deep), word c at
    columns PER_WORD c on -> the
    columns in the order in which the tensor cores' 16-bit A operand gives a thread its elements, so that a tile
    decoded a word an asm call needs no data moved between threads on its way there: words H q .. H q + H - 1 (H =
    32 / PER_WORD) go whole to the thread at lane q of their rows' quad, which holds columns 2 q, 2 q + 1, 2 q + 8
    and 2 q + 9 of each 16 (wgmma's layout, and mma.sync's as Triton lays out these tiles' operand: where it paired
    4 columns a lane, an earlier form of the loads, the tile took warp shuffles there). So word H q + h's element
    4 j + 2 a + e goes to column 16 (PER_WORD / 4 h + j) + 8 a + 2 q + e (H = C / PER_WORD / 4)."""
    H: tl.constexpr = v.shape[1] // PER_WORD // 4
    return tl.reshape(tl.permute(tl.reshape(v, (v.shape[0], 4, H, PER_WORD // 4, 2, 2)), (0, 2, 3, 4, 1, 5)),
                      v.shape)


@triton.jit
def sub_block_pairs_in_operand_order(v):
    """`[R, 16]`, a value pair per sub-block of a 128-deep tile (sub-block t at columns 2 t, 2 t + 1) -> in the
    order in which the tensor cores give a thread the operand, for sub-blocks t = 2 q + h held by the lane q of
    a quad that holds their words (`in_operand_order`, 16 elements a word): column 8 h + 2 q."""
    return tl.reshape(tl.permute(tl.reshape(v, (v.shape[0], 4, 2, 2)), (0, 2, 1, 3)), v.shape)


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
    b = (_first(k0, QK) + tl.arange(0, NB))[None, :]
    return b, _within(n_mask, b, K // QK)


@triton.jit
def _sub_blocks(k0, K, n_mask, QK: tl.constexpr, BLOCK_K: tl.constexpr):
    """A K-quant (or IQ4_XS) tile's super-block `s` (one scalar: a tile at most 256 deep lies in one), the indices
    `j` `[1, sub-blocks]` of its `QK`-element sub-blocks within `s`, and the rows' mask for `s`. The super-block's
    fields then load once a row, where indexed per sub-block each sub-block loaded its own (sm_90, per element:
    GEMM 128x128x128 Q3_K 9.67 -> 8.38, IQ4_XS 8.81 -> 8.52; Q4_K 8.00 -> 7.45 before `_k4_scales_mins`)."""
    tl.static_assert(BLOCK_K <= 256, "K-quant tiles lie in one super-block")
    NB: tl.constexpr = BLOCK_K // QK if BLOCK_K >= QK else 1
    s = k0 >> 8  # k0 >= 0: shifts and masks, where // and % of a signed k0 take a sign correction each
    # s as a [1, 1] tensor in the mask: Triton's interpreter types a mask & a scalar compare int32, and refuses it
    return s, ((k0 & 255) // QK + tl.arange(0, NB))[None, :], _within(n_mask, tl.full((1, 1), 0, tl.int32) + s,
                                                                      K // 256)


@triton.jit
def _code_words(w_ptr, plane, k0, K, n_mask, PER_WORD: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int32 words `[BLOCK_N, BLOCK_K // PER_WORD]` of the tile's codes, `PER_WORD` a word in element order (4
    int8 codes, a byte each; 8 4-bit codes, two a byte, the first in the low nibble; 16 2-bit codes, the first in
    the lowest bits)."""
    m = (_first(k0, PER_WORD) + tl.arange(0, BLOCK_K // PER_WORD))[None, :]
    return _typed(w_ptr, plane, m, _within(n_mask, m, K // PER_WORD), tl.int32)


@triton.jit
def _code_bits(w_ptr, plane, k0, K, n_mask, BITS: tl.constexpr, IQ4: tl.constexpr, tables_ptr, BIASED: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tile's codes `[BLOCK_N, BLOCK_K]` as int32 bits of the float32 2^23 + v (`BIASED`: the 128 form,
    128 + v * code_step; `float_bits`), from a plane of int8 codes (`BITS` 8, v = code + 128) or of 4-bit codes
    (v = code, or with `IQ4` kvalues_iq4nl[code] + 128), taken a 32-bit word at a time, or with `BIASED` ==
    FUSED_BYTES four bytes at a time (4-bit codes but IQ4's)."""
    if BITS == 8:
        bits = int8_float_bits(_code_words(w_ptr, plane, k0, K, n_mask, 4, BLOCK_K), BIASED)
    else:
        tl.static_assert(BITS == 4, "_code_bits: 8- or 4-bit codes")
        if (BIASED == FUSED_BYTES) and not IQ4:
            j = (_first(k0, 2) + tl.arange(0, BLOCK_K // 2))[None, :]
            codes = _load(w_ptr + plane + j, _within(n_mask, j, K // 2))
        else:
            codes = _code_words(w_ptr, plane, k0, K, n_mask, 8, BLOCK_K)
        bits = nibble_float_bits(codes, IQ4, tables_ptr, BIASED)
    return tl.reshape(bits, (BLOCK_N, BLOCK_K))


@triton.jit
def _k_quant_d(w_ptr, plane, s, mask):
    """The f16 scale (or min) of super-block `s`, as float32, `[BLOCK_N, 1]`."""
    return _typed(w_ptr, plane, s, mask, tl.float16).to(tl.float32)


@triton.jit
def _k_quant_d_of(w_ptr, plane, t, mask):
    """The f16 super-block scale (or min) of each 16-element sub-block `t`, as float32, `[BLOCK_N, sub-blocks]`.
    Q6_K and Q2_K load their scales per sub-block, not per super-block (`_sub_blocks`): their decoders count fewer
    instructions so (sm_90, GEMM 128x128x128 per element: Q6_K 9.70 against 10.12, Q2_K 9.22 against 9.41).
    Addressed in bytes: indexed in f16 elements, Q6_K's 16-deep GEMM tile spilled 16 bytes on sm_80-89."""
    return _typed(w_ptr, plane + 2 * (t // 16), 0, mask, tl.float16).to(tl.float32)


@triton.jit
def _in_half(j, QK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sub-block indices `j` (of `QK` elements, within their super-block) within their half of it. A 128-deep tile is
    a whole half, its k0 a multiple of 128: then they are the constants 0, 1, ..., and so are the byte indices and
    selects of its scales, where from a variable k0 each sub-block took a computed shift amount (sm_90 split-K,
    scheduler clocks an element: Q4_K 4.27 -> 4.06, Q5_K 5.59 -> 5.39, Q3_K 6.12 -> 5.59)."""
    if BLOCK_K == 128:
        return tl.arange(0, 128 // QK)[None, :]
    else:
        return j % (128 // QK)


@triton.jit
def _k4_scales_mins(w_ptr, plane, k0, s, j, mask, BLOCK_K: tl.constexpr):
    """Q4_K's and Q5_K's 6-bit scales and mins of sub-blocks `j` of super-block `s` (ggml's get_scale_min_k4):
    those of sub-blocks 0-3 in bits 0-5 of bytes j (scales) and 4 + j (mins), those of 4-7 in the nibbles of byte
    4 + j topped by bits 6-7 of bytes j - 4 and j. A tile at most 128 deep lies in one half of its super-block, so
    the whole tile takes one of the two forms, four bytes at a time: three 32-bit words a row, not three bytes a
    sub-block (sm_90, per element: Q4_K's FMA GEMV 4.02 -> 3.61, its GEMM 128x128x128 7.45 -> 7.61; Q5_K's GEMM
    8.83 -> 8.38). Each byte becomes a float by `float_bits.byte_float_bits` (one permute), not a shift, a mask and a
    conversion, and the words shift by `float_bits.shift_right` on the FMA pipe (Q5_K's split-K, clocks: 5.39 ->
    5.27 -> 5.19)."""
    tl.static_assert(BLOCK_K <= 128, "the tile lies in one half of a super-block")
    a = _typed(w_ptr, plane, 3 * s, mask, tl.int32)
    c = _typed(w_ptr, plane, 3 * s + 1, mask, tl.int32)
    e = _typed(w_ptr, plane, 3 * s + 2, mask, tl.int32)
    upper = (k0 >> 7) & 1  # sub-blocks 4-7
    low = tl.where(upper == 1, 0x0F0F0F0F, 0x3F3F3F3F)  # bytes below 64 either way: `byte_float_bits` takes them
    high = 0x30303030 * upper
    sc = (tl.where(upper == 1, e, a) & low) | (shift_right(a, 2) & high)
    mn = (tl.where(upper == 1, shift_right(e, 4), c) & low) | (shift_right(c, 2) & high)
    index = _in_half(j, 32, BLOCK_K) % 4
    return _bits_to_float(byte_float_bits(sc, index), 0), _bits_to_float(byte_float_bits(mn, index), 0)


@triton.jit
def _k3_scale_bits(w_ptr, plane, k0, s, j, mask, BLOCK_K: tl.constexpr):
    """Q3_K's 6-bit scales of sub-blocks `j` of super-block `s`, as the bits of the float32 2^23 + scale (ggml's 12
    bytes: sub-block j's low 4 bits in nibble j // 8 of byte j % 8, its top 2 in bits 2 (j // 4) of byte
    8 + j % 4). A tile at most 128 deep lies in one half of its super-block, so the whole tile takes the same
    nibble, four bytes at a time: three 32-bit words a row, not two bytes a sub-block (sm_90 per element: FMA GEMV
    5.26 -> 4.74, split-K 6.23 -> 5.80, GEMM 128x128x128 7.42 -> 7.22)."""
    words, index = _k3_scale_bytes(w_ptr, plane, k0, s, j, mask, BLOCK_K)
    return byte_float_bits(words, index)


@triton.jit
def _k3_scale_bytes(w_ptr, plane, k0, s, j, mask, BLOCK_K: tl.constexpr):
    """`_k3_scale_bits`' scales as bytes: the 32-bit word holding each sub-block's, and its byte index there."""
    tl.static_assert(BLOCK_K <= 128, "the tile lies in one half of a super-block")
    a = _typed(w_ptr, plane, 3 * s, mask, tl.int32)
    b = _typed(w_ptr, plane, 3 * s + 1, mask, tl.int32)
    c = _typed(w_ptr, plane, 3 * s + 2, mask, tl.int32)
    half = 4 * ((k0 >> 7) & 1)
    first = ((a >> half) & 0x0F0F0F0F) | (((c >> half) & 0x03030303) << 4)  # sub-blocks 0-3 of the half
    second = ((b >> half) & 0x0F0F0F0F) | (((c >> (half + 2)) & 0x03030303) << 4)  # 4-7
    j = _in_half(j, 16, BLOCK_K)
    return tl.where(j < 4, first, second), j % 4


@triton.jit
def q3_k_third_bits(w_ptr, rows, k0, K, n_mask, BLOCK_K: tl.constexpr):
    """Q3_K's third bits of the tile (its hmask plane at the rows' starts), `[BLOCK_N, BLOCK_K // 16]` int32, those
    of each 16 elements spread a nibble to a byte (`float_bits._third_bits_in_element_order`): a word of the plane
    holds 32 elements' so (`kernels.repack.PLANE_ORDERS`), the first 16's as loaded, the others' shifted down 4."""
    m = (_first(k0, 16) + tl.arange(0, BLOCK_K // 16))[None, :]
    return _typed(w_ptr, rows, m >> 1, _within(n_mask, m, K // 16), tl.int32) >> (4 * (m & 1))


@triton.jit
def _k3_scales(w_ptr, plane, k0, s, j, mask, BLOCK_K: tl.constexpr):
    """Q3_K's sub-block scales `_k3_scale_bits` less 32, as float32."""
    return _bits_to_float(_k3_scale_bits(w_ptr, plane, k0, s, j, mask, BLOCK_K), 32)


@triton.jit
def _five_bit_code_bits(w_ptr, low_plane, fifth_plane, k0, K, n_mask, BIASED: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Q5_0, Q5_1, Q5_K: the tile's 5-bit codes as int32 bits of the float32 2^23 + code (`BIASED`: 128 + code),
    8 elements at a time: a 32-bit word of a plane of 4-bit codes and a byte of a plane of fifth bits (bit e
    of byte m: element 8m + e, as Q5_0's and Q5_1's little-endian u32 per block has them too)."""
    m = (_first(k0, 8) + tl.arange(0, BLOCK_K // 8))[None, :]
    fifth = _by_fours(w_ptr, fifth_plane, m, n_mask, K // 8, tl.uint8, BLOCK_N, BLOCK_K // 8)
    bits = five_bit_float_bits(_typed(w_ptr, low_plane, m, _within(n_mask, m, K // 8), tl.int32), fifth.to(tl.int32),
                               BIASED)
    return tl.reshape(bits, (BLOCK_N, BLOCK_K))


_FORMAT_NAMES = {i: name for name, i in FORMAT_IDS.items()}


@triton.constexpr_function
def sub_block_size(fmt: int) -> int:
    """Elements sharing one scale (and offset) in `decode_planes_parts`."""
    return {"NF4": 64, "Q6_K": 16, "Q3_K": 16, "Q2_K": 16}.get(_FORMAT_NAMES[fmt], 32)


@triton.constexpr_function
def has_code_book(fmt: int) -> bool:
    """Whether `fmt`'s 4-bit codes index a code book (NF4's, IQ4's values), a scale a block of
    `sub_block_size(fmt)` elements (`_code_book_scales`)."""
    return _FORMAT_NAMES[fmt] in ("NF4", "IQ4_NL", "IQ4_XS")


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
def has_biased_form(fmt: int) -> bool:
    """Whether `decode_planes_parts` can give `fmt`'s codes in the 128 form: every format whose codes are integers
    (not NF4's float32 values)."""
    return _FORMAT_NAMES[fmt] != "NF4"


@triton.constexpr_function
def code_step(fmt: int) -> float:
    """The 128 form's step for `fmt`'s stored codes c, 128 + c * step (`float_bits`): 1 for codes below 128, 1/256
    for the offset-binary bytes of Q8_0 and IQ4 (up to 255)."""
    return 1 / 256 if _FORMAT_NAMES[fmt] in ("Q8_0", "IQ4_NL", "IQ4_XS") else 1.0


@triton.constexpr_function
def decodes_by_multiply_add(fmt: int) -> bool:
    """Whether `decode_planes_tile`'s fused form decodes `fmt` as one multiply-add of the 128 form, (128 + c s)
    (scale / s) + base, its weight the reference's but for base's rounding (s = `code_step`). Codes below 128 give
    an 8-bit by 11-bit product and base -(128 + offset) scale (+ min). Bytes give a 16-bit factor, exact in the
    multiply-add, and base -(128 + 128 / 256) (256 scale), exact for a scale of at most 15 significant bits, Q8_0's
    and IQ4_NL's f16 d: the weight is the reference's float32 one. IQ4_XS's d (scale - 32) has up to 17, and base
    would round to 2^-9 of a scale, more than a bit of small weights, so IQ4_XS keeps the exact form there (its
    bf16 tiles look weights up in `float_bits.code_book_bf16`)."""
    return _FORMAT_NAMES[fmt] not in ("NF4", "IQ4_XS")


@triton.jit
def _iq4_d(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """IQ4_NL's f16 block scales `d` of the tile's blocks, `[BLOCK_N, blocks]`, or IQ4_XS's super-block one,
    `[BLOCK_N, 1]`, as float32."""
    if FMT == IQ4_NL:  # d (f16) | codes
        b, b_mask = _blocks(k0, K, n_mask, 32, BLOCK_K)
        d = _typed(w_ptr, rows, b, b_mask, tl.float16).to(tl.float32)
    else:
        tl.static_assert(FMT == IQ4_XS, "_iq4_d: IQ4_NL or IQ4_XS")
        s, _, s_mask = _sub_blocks(k0, K, n_mask, 32, BLOCK_K)
        d = _k_quant_d(w_ptr, rows, s, s_mask)
    return d


@triton.jit
def _iq4_xs_scales(w_ptr, rows, k0, K, n_mask, BLOCK_K: tl.constexpr, SHIFTS_IN_HALF: tl.constexpr):
    """IQ4_XS's 6-bit sub-block scales (32 elements a sub-block, stored + 32) of the tile's sub-blocks, `[BLOCK_N,
    sub-blocks]` int32. The planes: d | scales_h (2 bits a sub-block) | scales_l (4 bits a sub-block) | codes; a
    super-block's 4 bytes of low bits and 2 of top bits load whole once a row, where a byte each a sub-block
    loaded 16 a row (sm_90 per element: split-K 5.41 -> 5.15, FMA GEMV 5.64 -> 5.31). `SHIFTS_IN_HALF` (tiles at
    most 128 deep): a shift by the tile's half of the super-block first, then shifts by constants in a 128-deep tile
    (`_in_half`); it counts fewer in the M = 1 and split-K kernels (sm_90 scheduler clocks an element: integer GEMV
    3.12 -> 3.02, split-K on f16 weights 4.48 -> 4.32) and more in the GEMM and the dequantize kernel (128 x 128 x
    128: 7.88 -> 7.97, dequantize 12.5 -> 13.1)."""
    nb = K // 256
    s, j, s_mask = _sub_blocks(k0, K, n_mask, 32, BLOCK_K)
    low = _typed(w_ptr, rows + 2 * _plane_bytes(nb, 2), s, s_mask, tl.int32)
    top = _typed(w_ptr, rows + _plane_bytes(nb, 2), s, s_mask, tl.uint16).to(tl.int32)
    if SHIFTS_IN_HALF:
        tl.static_assert(BLOCK_K <= 128, "the tile lies in one half of a super-block")
        upper = (k0 >> 7) & 1  # sub-blocks 4-7
        j = _in_half(j, 32, BLOCK_K)
        low = low >> (16 * upper)
        top = top >> (8 * upper)
    return ((low >> (4 * j)) & 15) | (((top >> (2 * j)) & 3) << 4)


@triton.jit
def _code_book_plane(K, FMT: tl.constexpr):
    """The byte offset within a row of NF4's, IQ4_NL's or IQ4_XS's plane of 4-bit codes (two a byte, the first in
    the low nibble)."""
    if FMT == NF4:  # absmax (f32) | codes
        plane = _plane_bytes(K // 64, 4)
    elif FMT == IQ4_NL:
        plane = _plane_bytes(K // 32, 2)
    else:
        plane = 2 * _plane_bytes(K // 256, 2) + _plane_bytes(K // 256, 4)
    return plane


@triton.jit
def _code_book_scales(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, BLOCK_K: tl.constexpr,
                      SHIFTS_IN_HALF: tl.constexpr = False):
    """NF4's, IQ4_NL's and IQ4_XS's float32 scales `[BLOCK_N, blocks]` of the tile's blocks of `sub_block_size(FMT)`
    elements, and the byte offset within a row of their plane of codes (`_code_book_plane`); `SHIFTS_IN_HALF`:
    `_iq4_xs_scales`'."""
    if FMT == NF4:
        b, b_mask = _blocks(k0, K, n_mask, 64, BLOCK_K)
        scale = _typed(w_ptr, rows, b, b_mask, tl.float32)
    elif FMT == IQ4_NL:
        scale = _iq4_d(w_ptr, rows, k0, K, n_mask, FMT, BLOCK_K)
    else:
        sub_scales = _iq4_xs_scales(w_ptr, rows, k0, K, n_mask, BLOCK_K, SHIFTS_IN_HALF)
        scale = _iq4_d(w_ptr, rows, k0, K, n_mask, FMT, BLOCK_K) * (sub_scales - 32).to(tl.float32)
    return scale, _code_book_plane(K, FMT)


@triton.jit
def _code_value(bits, FMT: tl.constexpr, BIASED: tl.constexpr):
    if BIASED:
        v = bits.to(tl.float32, bitcast=True)
    else:
        v = _bits_to_float(bits, code_offset(FMT))
    return v


@triton.jit
def decode_planes_parts(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, tables_ptr, BIASED: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(v, scale, offset): the tile's weights are `v * scale + offset`, v `[BLOCK_N, BLOCK_K]` per element, scale and
    offset `[BLOCK_N, sub-blocks]` per sub-block of `sub_block_size(FMT)` elements (offset only where
    `has_offset(FMT)`; elsewhere it is the scale again, unused). With `BIASED` (FUSED or FUSED_BYTES, where
    `has_biased_form(FMT)`) v is instead 128 + (v + code_offset(FMT)) * code_step(FMT), the stored code in the 128
    form (`float_bits`)."""
    if has_code_book(FMT):
        scale, plane = _code_book_scales(w_ptr, rows, k0, K, n_mask, FMT, BLOCK_K)
        if FMT == NF4:
            v = tl.reshape(nf4_values(_code_words(w_ptr, rows + plane, k0, K, n_mask, 8, BLOCK_K), tables_ptr),
                           (BLOCK_N, BLOCK_K))
        else:
            v = _code_value(_code_bits(w_ptr, rows + plane, k0, K, n_mask, 4, True, tables_ptr, BIASED, BLOCK_N,
                                       BLOCK_K), FMT, BIASED)
        offset = scale
    elif (FMT == Q6_K) | (FMT == Q3_K) | (FMT == Q2_K):
        # 16-element sub-blocks; the planes follow the block's fields (kernels/repack.py)
        nb = K // 256
        if FMT == Q6_K:  # ql: low 4 bits | qh: top 2 bits | int8 scales | d
            high_plane = _plane_bytes(nb, 128)
            scale_plane = high_plane + _plane_bytes(nb, 64)
            t, t_mask = _blocks(k0, K, n_mask, 16, BLOCK_K)
            scale = _k_quant_d_of(w_ptr, rows + scale_plane + _plane_bytes(nb, 16), t, t_mask) * \
                _typed(w_ptr, rows + scale_plane + t, 0, t_mask, tl.int8).to(tl.float32)
            # 8 elements at a time: a 32-bit word of low 4 bits and a 16-bit word of top 2 bits
            m = (_first(k0, 8) + tl.arange(0, BLOCK_K // 8))[None, :]
            m_mask = _within(n_mask, m, K // 8)
            bits = six_bit_float_bits(_typed(w_ptr, rows, m, m_mask, tl.int32),
                                      _typed(w_ptr, rows + high_plane, m, m_mask, tl.uint16).to(tl.int32), BIASED)
            v = _code_value(tl.reshape(bits, (BLOCK_N, BLOCK_K)), FMT, BIASED)
            offset = scale
        elif FMT == Q3_K:  # hmask: third bits | qs: low 2 bits | 12 bytes of 6-bit scales | d
            s, j, s_mask = _sub_blocks(k0, K, n_mask, 16, BLOCK_K)
            low_plane = _plane_bytes(nb, 32)
            scale_plane = low_plane + _plane_bytes(nb, 64)
            scale = _k_quant_d(w_ptr, rows + scale_plane + _plane_bytes(nb, 12), s, s_mask) * \
                _k3_scales(w_ptr, rows + scale_plane, k0, s, j, s_mask, BLOCK_K)
            # 16 elements at a time: a 32-bit word of low bits and their third bits
            m = (_first(k0, 16) + tl.arange(0, BLOCK_K // 16))[None, :]
            m_mask = _within(n_mask, m, K // 16)
            bits = three_bit_float_bits(_typed(w_ptr, rows + low_plane, m, m_mask, tl.int32),
                                        q3_k_third_bits(w_ptr, rows, k0, K, n_mask, BLOCK_K), BIASED)
            v = _code_value(tl.reshape(bits, (BLOCK_N, BLOCK_K)), FMT, BIASED)
            offset = scale
        else:  # Q2_K: scales (a byte each: scale | min << 4) | qs: 2-bit codes | d | dmin
            codes_plane = _plane_bytes(nb, 16)
            d_plane = codes_plane + _plane_bytes(nb, 64)
            t, t_mask = _blocks(k0, K, n_mask, 16, BLOCK_K)
            packed = _load(w_ptr + rows + t, t_mask).to(tl.int32)
            scale = _k_quant_d_of(w_ptr, rows + d_plane, t, t_mask) * (packed & 15).to(tl.float32)
            offset = -(_k_quant_d_of(w_ptr, rows + d_plane + _plane_bytes(nb, 2), t, t_mask) *
                       (packed >> 4).to(tl.float32))
            bits = two_bit_float_bits(_code_words(w_ptr, rows + codes_plane, k0, K, n_mask, 16, BLOCK_K), BIASED)
            v = _code_value(tl.reshape(bits, (BLOCK_N, BLOCK_K)), FMT, BIASED)
    elif (FMT == Q4_K) | (FMT == Q5_K):
        # 32-element sub-blocks: d | dmin | 12 bytes of 6-bit scales and mins | (Q5_K: qh, fifth bits) | qs
        nb = K // 256
        s, j, s_mask = _sub_blocks(k0, K, n_mask, 32, BLOCK_K)
        dmin_plane = _plane_bytes(nb, 2)
        scale_plane = dmin_plane + _plane_bytes(nb, 2)
        codes_plane = scale_plane + _plane_bytes(nb, 12)
        sc, mn = _k4_scales_mins(w_ptr, rows + scale_plane, k0, s, j, s_mask, BLOCK_K)
        scale = _k_quant_d(w_ptr, rows, s, s_mask) * sc
        offset = -(_k_quant_d(w_ptr, rows + dmin_plane, s, s_mask) * mn)
        if FMT == Q4_K:
            bits = _code_bits(w_ptr, rows + codes_plane, k0, K, n_mask, 4, False, tables_ptr, BIASED, BLOCK_N,
                              BLOCK_K)
        else:
            bits = _five_bit_code_bits(w_ptr, rows + codes_plane + _plane_bytes(nb, 32), rows + codes_plane, k0, K,
                                       n_mask, BIASED, BLOCK_N, BLOCK_K)
        v = _code_value(bits, FMT, BIASED)
    else:
        tl.static_assert((FMT == Q8_0) | (FMT == Q4_0) | (FMT == Q4_1) | (FMT == Q5_0) | (FMT == Q5_1),
                         "decode_planes_tile: format without a planes layout")
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
                                       n_mask, BIASED, BLOCK_N, BLOCK_K)
        else:
            bits = _code_bits(w_ptr, rows + codes_plane, k0, K, n_mask, 8 if FMT == Q8_0 else 4, False, tables_ptr,
                              BIASED, BLOCK_N, BLOCK_K)
        v = _code_value(bits, FMT, BIASED)
    return v, scale, offset


@triton.jit
def decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, tables_ptr, FORM: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`FORM` EXACT: the reference's float32 weights bit for bit, `(code - offset) * scale (+ offset)`, each operation
    rounded as it rounds (the dequantize kernel, compiled without multiply-add fusion). Otherwise (FUSED,
    FUSED_BYTES), where `decodes_by_multiply_add(FMT)`, `(128 + code * step) * (scale / step) + base` with the block's
    `base = offset - (128 + code offset * step) * (scale / step)` (`code_step`): one multiply-add an element (tl.fma:
    one rounding whether or not the compiler fuses) where the exact form takes a subtraction, a multiply and an add,
    for the fused kernels, whose decoded weight may differ in its last bit (sm_90, per element: split-K GEMV Q4_0
    5.09 -> 4.22, GEMM 128x128x128 Q4_0 6.56 -> 5.72, Q4_K 7.61 -> 6.64; Q8_0's bytes 4.59 -> 3.71)."""
    QK: tl.constexpr = sub_block_size(FMT)
    BIASED: tl.constexpr = FORM if decodes_by_multiply_add(FMT) else EXACT
    v, scale, offset = decode_planes_parts(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, BIASED, BLOCK_N, BLOCK_K)
    if BIASED:
        if code_step(FMT) != 1:
            scale = scale * (1 / code_step(FMT))
        base = -(128 + code_offset(FMT) * code_step(FMT)) * scale
        if has_offset(FMT):
            base += offset
        w = tl.fma(v, _expand(scale, BLOCK_N, BLOCK_K, QK), _expand(base, BLOCK_N, BLOCK_K, QK))
    else:
        w = v * _expand(scale, BLOCK_N, BLOCK_K, QK)
        if has_offset(FMT):
            w += _expand(offset, BLOCK_N, BLOCK_K, QK)
    return w


@triton.jit
def _code_book_words(w_ptr, plane, m, K, n_mask, scale, WORDS: tl.constexpr, FMT: tl.constexpr, tables_ptr,
                     BLOCK_N: tl.constexpr, C: tl.constexpr):
    """The bf16 weights `[BLOCK_N, C]` of the 64-bit words `m` (`[1, C / 16]`) of a plane of 4-bit code-book codes,
    `WORDS` consecutive ones in a block of `scale` (`[BLOCK_N, C / (16 WORDS)]`)."""
    codes = _typed(w_ptr, plane, m, _within(n_mask, m, K // 16), tl.int64)
    w = code_book_bf16(codes, _expand(scale, BLOCK_N, C // 16, WORDS), FMT != NF4, tables_ptr)
    return tl.reshape(w, (BLOCK_N, C))


@triton.jit
def decode_planes_tile_as(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, tables_ptr, DTYPE: tl.constexpr,
                          FORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`decode_planes_tile(...).to(DTYPE)`. The code-book formats (NF4, IQ4_NL, IQ4_XS) to bf16 in tiles at least 64
    deep go 16 elements of a block at a time (`float_bits.code_book_bf16`): on NVIDIA GPUs the block's 16 possible
    weights are rounded to bf16 once per block and each element looks its weight up in them, which saves a multiply
    and a conversion an element, and looks up two byte tables where NF4's float32 values take four and a byte
    transpose (sm_90 GEMM, 128x128x128: NF4 9.9 -> 8.0 instructions a decoded element), where IQ4's offset-binary
    bytes take a subtraction an element (IQ4_NL 7.69 -> 6.70, IQ4_XS 8.52 -> 7.72; split-K 5.84 -> 4.88, 6.35 ->
    5.41). In shallower tiles the 16 outputs of a call regroup through shared memory (NF4 19.9 -> 34.9, IQ4_NL's
    64x128x32 GEMM 17.8 -> 34.1), so those decode to float32 first, as every other case does.

    NF4's 64-element blocks in the fused kernels' 128-deep tiles (`FORM` not EXACT; 64 or 128 elements a thread): a
    block's four words of codes load as two 128-bit halves of the same shape, so one thread holds the whole block,
    makes its four calls and builds the table once (ptxas shares it between calls with the same scale register);
    loaded as one tile of words, two a thread, it was built for every 32 elements (per element, sm_90: split-K
    4.69 -> 4.18 (since replaced by `nf4_level_tile`), GEMM 128x128x128 6.52 -> 6.12; sm_80: split-K 4.95 ->
    4.37). The halves' join and its transpose
    back into element order stay in registers there. Tiles with fewer elements a thread get no shared table and
    pay for the join: the 64-deep GEMM tiles (sm_90 128x128x64 7.59 -> 7.94, sm_80 8.94 -> 9.25), and the
    dequantize kernel's, 16 a thread, where they went through shared memory (10.4 -> 30.0)."""
    if has_code_book(FMT) and (DTYPE == tl.bfloat16) and (BLOCK_K >= 64):
        scale, plane = _code_book_scales(w_ptr, rows, k0, K, n_mask, FMT, BLOCK_K)
        WORDS: tl.constexpr = sub_block_size(FMT) // 16  # a block's 64-bit words of 16 codes
        if (WORDS == 4) and (FORM != EXACT) and (BLOCK_K >= 128):
            NB: tl.constexpr = BLOCK_K // 64
            m = tl.reshape((_first(k0, 16) + 4 * tl.arange(0, NB))[:, None] + tl.arange(0, 2)[None, :], (1, 2 * NB))
            scale = _expand(scale, BLOCK_N, 2 * NB, 2)  # a scale a word (before the loads: sm_90 4.21 -> 4.16)
            first = _code_book_words(w_ptr, rows + plane, m, K, n_mask, scale, 1, FMT, tables_ptr, BLOCK_N,
                                     BLOCK_K // 2)
            second = _code_book_words(w_ptr, rows + plane, m + 2, K, n_mask, scale, 1, FMT, tables_ptr, BLOCK_N,
                                      BLOCK_K // 2)
            halves = tl.join(tl.reshape(first, (BLOCK_N, NB, 32)), tl.reshape(second, (BLOCK_N, NB, 32)))
            w = tl.reshape(tl.permute(halves, (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
        else:
            m = (_first(k0, 16) + tl.arange(0, BLOCK_K // 16))[None, :]
            w = _code_book_words(w_ptr, rows + plane, m, K, n_mask, scale, WORDS, FMT, tables_ptr, BLOCK_N, BLOCK_K)
    else:
        w = decode_planes_tile(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, FORM, BLOCK_N, BLOCK_K).to(DTYPE)
    return w


@triton.constexpr_function
def _iq4_d_exponent(fmt: int) -> int:
    """The exponent e with each row's largest |d| scaled into [2^e, 2^(e + 1)) in `iq4_half_tile`: every weight
    then lies below 2^15 (IQ4_NL: level * d, levels up to 127 in magnitude; IQ4_XS: level * (scale - 32) * d,
    scale - 32 down to -32)."""
    return 7 if fmt == IQ4_NL else 2


@triton.jit
def iq4_row_shifts(w_ptr, rows, k_start, k_end, K, n_mask, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """`[BLOCK_N]` int32 shifts: 2^shift takes the largest |d| of IQ4_NL's blocks (IQ4_XS's super-blocks) in
    columns k_start .. k_end of each row into [2^e, 2^(e + 1)) (`_iq4_d_exponent`; at most 2^126, for rows of
    zeros)."""
    top = tl.max(tl.zeros_like(rows), axis=1)
    for k0 in range(k_start, k_end, BLOCK_K):
        d = _iq4_d(w_ptr, rows, k0, K, n_mask, FMT, BLOCK_K)
        top = tl.maximum(top, tl.max(tl.abs(d).to(tl.int32, bitcast=True) >> 23, axis=1))
    return tl.minimum(127 + _iq4_d_exponent(FMT) - top, 126)


@triton.jit
def _half_bits(v):
    """f16 values -> their bits in both halves of an int32."""
    bits = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def iq4_half_tile(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, tables_ptr, factor, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """IQ4_NL's or IQ4_XS's weights times `factor` (`[BLOCK_N, 1]`, a power of two a row: `iq4_row_shifts`) as f16,
    `[BLOCK_N, BLOCK_K]`: level * scale, each an f16 multiply (`float_bits.iq4_half_weights`), the scale IQ4_NL's
    d * factor, exact in f16, or IQ4_XS's f16(d * factor) * (scale - 32). Every weight lies below 2^15, and those
    of blocks within 2^21 of the row's largest d keep 11 significant bits, where the bf16 weights keep 8."""
    d = (_iq4_d(w_ptr, rows, k0, K, n_mask, FMT, BLOCK_K) * factor).to(tl.float16)
    if FMT == IQ4_XS:
        # 1024 + scale (6 bits) is exact in f16, and so is its difference with 1056
        sub_scales = (_iq4_xs_scales(w_ptr, rows, k0, K, n_mask, BLOCK_K, True) | 0x6400).to(tl.int16).to(
            tl.float16, bitcast=True) - 1056.0
        d = d * sub_scales
    codes = _code_words(w_ptr, rows + _code_book_plane(K, FMT), k0, K, n_mask, 8, BLOCK_K)
    pairs = _expand(_half_bits(d), BLOCK_N, BLOCK_K // 8, 4)  # a block's (sub-block's) 32 codes: 4 words
    return tl.reshape(iq4_half_weights(codes, pairs, tables_ptr), (BLOCK_N, BLOCK_K))


@triton.jit
def nf4_level_tile(w_ptr, rows, k0, K, n_mask, tables_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """NF4's tile at k0, at most a block deep, as f16 levels NF4_LEVEL_SCALE * value[code]
    (`float_bits.nf4_half_levels`), `[BLOCK_N, BLOCK_K]` in `in_operand_order`, and its block's absmax,
    `[BLOCK_N, 1]` float32: the weights are absmax / NF4_LEVEL_SCALE times them. A thread loads the code words the
    tensor cores' operand gives it (`_in_operand_rows`) and decodes them in place, as `q2_k_int_tiles` does."""
    tl.static_assert(BLOCK_K == 64, "one block a tile")
    absmax, plane = _code_book_scales(w_ptr, rows, k0, K, n_mask, NF4, BLOCK_K)
    m = (_first(k0, 8) + tl.arange(0, BLOCK_K // 8))[None, :]
    codes = _in_operand_rows(w_ptr, rows + plane, m, _within(n_mask, m, K // 8), tl.int32)
    levels = tl.reshape(nf4_half_levels(codes, tables_ptr), (BLOCK_N, BLOCK_K))
    return in_operand_order(levels, 8), absmax


@triton.jit
def q3_k_scale_bits(w_ptr, rows, k0, K, n_mask):
    """The bytes of Q3_K's 6-bit scales that `q3_k_int_tile` takes, of the super-block of column k0: for the two
    sub-blocks of each half the tensor cores' operand gives a thread (2 q and 2 q + 1 of the half), their low bits
    (bytes 2 q and 2 q + 1: a nibble each half) and their top bits (bytes 8 + 2 (q % 2) and 9 + 2 (q % 2)), a 16-bit
    load each (`_in_operand_rows`), `[BLOCK_N, 4]` int32: one load serves both halves."""
    nb = K // 256  # hmask: third bits | qs: low 2 bits | 12 bytes of 6-bit scales | d
    s, _, s_mask = _sub_blocks(k0, K, n_mask, 16, 128)
    scale_plane = _plane_bytes(nb, 32) + _plane_bytes(nb, 64)
    q = tl.arange(0, 4)[None, :]
    low_bits = _in_operand_rows(w_ptr, rows + scale_plane, 6 * s + q, s_mask, tl.uint16).to(tl.int32)
    top_bits = _in_operand_rows(w_ptr, rows + scale_plane, 6 * s + 4 + (q & 1), s_mask, tl.uint16).to(tl.int32)
    return low_bits, top_bits


@triton.jit
def q3_k_int_tile(w_ptr, rows, k0, K, n_mask, scale_bits, tables_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q3_K's 128-deep tile as the bf16 integers (code - 4) * (scale - 32), `[BLOCK_N, 128]` with each 16 columns in
    4 x 4 transposed order (`float_bits.three_bit_ints`) and then the tile's in `in_operand_order`, and its
    super-block's d, `[BLOCK_N, 1]` float32: the weights are d times them, exactly the reference's float32 ones.
    As `q2_k_int_tiles`, a thread loads the words of the two sub-blocks the tensor cores' operand gives it, and
    takes their scales from `scale_bits` (`q3_k_scale_bits`) by shifts that depend on the thread and the tile's
    half of the super-block, from the lookup table (`float_bits.Q3_K_SCALE_SHIFTS`): computed from either, they
    would keep the tile from the operand's registers."""
    tl.static_assert(BLOCK_K == 128, "8 sub-blocks a tile")
    nb = K // 256
    s, _, s_mask = _sub_blocks(k0, K, n_mask, 16, BLOCK_K)
    low_plane = _plane_bytes(nb, 32)
    d = _k_quant_d(w_ptr, rows + low_plane + _plane_bytes(nb, 64) + _plane_bytes(nb, 12), s, s_mask)
    low_bits, top_bits = scale_bits
    q = tl.arange(0, 4)[None, :]
    half = (k0 >> 7) & 1
    shifts = (tables_ptr + Q3_K_SCALE_SHIFTS_AT).to(tl.pointer_type(tl.int32))
    low_shift = tl.load(shifts + half + tl.zeros((1, 1), tl.int32))
    top_shift = tl.load(shifts + 2 + 4 * half + q)
    scales = ((low_bits >> low_shift) & 0x0F0F) | (((top_bits >> top_shift) & 0x0303) << 4)
    first_pairs, first_offsets = int_scale_pairs(scales, 0, True, tables_ptr)
    second_pairs, second_offsets = int_scale_pairs(scales, 1, True, tables_ptr)
    # 32 elements (two sub-blocks) an asm call: a 64-bit word of low bits and a word of the third bits' plane
    p = (_first(k0, 32) + q)
    p_mask = _within(n_mask, p, K // 32)
    w = three_bit_ints(_in_operand_rows(w_ptr, rows + low_plane, p, p_mask, tl.int64),
                       _in_operand_rows(w_ptr, rows, p, p_mask, tl.int32), first_pairs, first_offsets,
                       second_pairs, second_offsets, tables_ptr)
    return in_operand_order(tl.reshape(w, (BLOCK_N, BLOCK_K)), 32), d


@triton.jit
def q2_k_int_tiles(w_ptr, rows, k0, K, n_mask, tables_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q2_K's 128-deep tile as the bf16 integers code * scale times 1, 4 or 16, `[BLOCK_N, 128]` with each 16
    columns in `float_bits.two_bit_ints`' order and then the tile's in `in_operand_order`, its 8
    sub-blocks' mins as bf16 `[BLOCK_N, 16]` (a pair of columns each, for `qmatmul._sub_block_sums_hi_lo`, in
    `sub_block_pairs_in_operand_order`), and its super-block's d and dmin, `[BLOCK_N, 1]` float32: the weights are
    d * (code * scale) - dmin * min, exactly the reference's float32 ones. A thread loads the code words and scale
    bytes of the sub-blocks the tensor cores' operand gives it (`_in_operand_rows`) and decodes them in place:
    decoded where Triton laid the loads out, the tile went to the operand's registers through shared memory (split-K
    kernel, 128 deep, scheduler clocks a weight element: sm_90 2.87 -> 2.55, sm_80 3.19 -> 2.87)."""
    tl.static_assert(BLOCK_K == 128, "8 sub-blocks a tile")
    nb = K // 256  # scales (a byte each: scale | min << 4) | qs: 2-bit codes | d | dmin
    codes_plane = _plane_bytes(nb, 16)
    d_plane = codes_plane + _plane_bytes(nb, 64)
    s, _, s_mask = _sub_blocks(k0, K, n_mask, 16, BLOCK_K)
    d = _k_quant_d(w_ptr, rows + d_plane, s, s_mask)
    dmin = _k_quant_d(w_ptr, rows + d_plane + _plane_bytes(nb, 2), s, s_mask)
    p = (_first(k0, 32) + tl.arange(0, 4))[None, :]  # the scale bytes two sub-blocks a load, as the codes go
    pairs = _in_operand_rows(w_ptr, rows, p, _within(n_mask, p, K // 32), tl.uint16).to(tl.int32)
    scales = pairs & 0x0F0F
    mins = (pairs >> 4) & 0x0F0F
    m = (_first(k0, 16) + tl.arange(0, 8))[None, :]
    codes = _in_operand_rows(w_ptr, rows + codes_plane, m, _within(n_mask, m, K // 16), tl.int32)
    first_pairs, first_offsets = int_scale_pairs(scales, 0, False, tables_ptr)
    second_pairs, second_offsets = int_scale_pairs(scales, 1, False, tables_ptr)
    w = two_bit_ints(codes, tl.reshape(tl.join(first_pairs, second_pairs), (BLOCK_N, 8)),
                     tl.reshape(tl.join(first_offsets, second_offsets), (BLOCK_N, 8)), tables_ptr)
    w = in_operand_order(tl.reshape(w, (BLOCK_N, BLOCK_K)), 16)
    mins = tl.join(bf16_halves(int_scale_pairs(mins, 0, False, tables_ptr)[0]),
                   bf16_halves(int_scale_pairs(mins, 1, False, tables_ptr)[0]))  # [R, 4, 2 (the min twice), 2]
    mins = tl.permute(mins, (0, 3, 1, 2))
    return tl.reshape(w, (BLOCK_N, BLOCK_K)), tl.reshape(mins, (BLOCK_N, 16)), d, dmin
