"""M = 1 on integer dot products: x as 16-bit integers, codes as bytes, `dp2a` (IDP.2A) two products an
instruction into an int32 sum per sub-block, scaled once per 32 elements.

The FMA GEMV (`qmatmul.gemv_kernel`) spends an instruction an element turning a code into a float and one
multiplying it into the sums. Formats with few bits an element do not stream their bytes in that time: Q2_K's 2.6
bits allow about 2.4 scheduler clocks an element on an H100, and a permute on the integer pipe (two clocks, since
it takes a warp instruction every other clock) plus the multiply-add already take 2 (`bench.sass`). Here a mask
gives four 2-bit codes a register as bytes (IQ4: two permutes look four codes' int8 levels up), and `dp2a`
multiplies two of them by two 16-bit x values into an int32 sum on the FMA pipe: half an instruction an element
there, as ggml's `mmvq` kernels do with `dp4a` and 8-bit activations. The sub-block scales (Q2_K's, Q3_K's) are
integers too; an int32 sum per 32 elements then meets its float32 scales once.

x first goes to 16-bit integers (`quantize_x_kernel`), 32 values at a time by a power of two: the largest then
lies in [2^14, 2^15). A bf16 x is exact there for every value within 2^7 of its group's largest (its 8
significant bits fit), and a smaller one is rounded to 2^-15 of the largest at most, far below the bf16 output's own
rounding of 2^-9: 2-5e-6 of the output's norm, 6-8e-5 next to activations 300 times the rest
(tests/test_triton_kernels.py bounds it). The weights stay the reference's: codes times integer sub-block scales
are exact integers, the block scales multiply the sums in float32.
"""

import triton
import triton.language as tl

from kernels.triton.decode import IQ4_NL, IQ4_XS, Q2_K, Q3_K
from kernels.triton.decode_planes import (_code_book_scales, _code_words, _first, _k3_scale_bits, _k_quant_d, _load,
                                          _plane_bytes, _sub_blocks, _typed, _within, q3_k_third_bits)
from kernels.triton.float_bits import FLOAT_OF_TWO_POW_23, PTX, iq4_int8_bytes, power_of_two, shift_right

X_GROUP = tl.constexpr(32)  # x values sharing one power-of-two scale
MAX_EXPONENT_SHIFT = tl.constexpr(141)  # 127 + 14: a group's largest x, of biased exponent e, times 2^(141 - e) lies in [2^14, 2^15)


@triton.jit
def x_shift(exponent):
    """The shift whose 2^shift takes values whose largest has the biased float32 exponent `exponent` into
    [2^14, 2^15): at most 126, for zeros and subnormals."""
    return tl.minimum(MAX_EXPONENT_SHIFT - exponent, 126)


@triton.jit
def transpose_4x4(v):
    """`[R, C]` -> each 16 columns in Q2_K's and Q3_K's 2-bit fields' order: position 4j + b holds column 4b + j
    (field j of byte b of a word of 16 codes)."""
    return tl.reshape(tl.permute(tl.reshape(v, (v.shape[0], v.shape[1] // 16, 4, 4)), (0, 1, 3, 2)), v.shape)


@triton.constexpr_function
def _dp2a_ptx(high: bool) -> str:
    return f"dp2a.{'hi' if high else 'lo'}.s32.s32 $0, $1, $2, $3;"


@triton.jit
def dot2(x_pair, codes, acc, HIGH: tl.constexpr):
    """acc + the two signed 16-bit halves of `x_pair` times signed bytes 0 and 1 of `codes` (`HIGH`: bytes 2 and
    3), int32: one `dp2a`."""
    if PTX:
        out = tl.inline_asm_elementwise(_dp2a_ptx(HIGH), "=r,r,r,r", [x_pair, codes, acc], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        SHIFT: tl.constexpr = 16 if HIGH else 0
        out = acc + ((x_pair << 16) >> 16) * ((codes << (24 - SHIFT)) >> 24) + \
            (x_pair >> 16) * ((codes << (16 - SHIFT)) >> 24)
    return out


@triton.jit
def quantize_x_kernel(x_ptr, xq_ptr, scale_ptr, sum_ptr, y_ptr, N, K, TRANSPOSE_4X4: tl.constexpr,
                      BLOCK: tl.constexpr):
    """x `[K]` -> int16 `xq` with x = xq * scale for each group of `X_GROUP` (a power of two in `scale_ptr`), and
    the sum of xq over each 16 in `sum_ptr` (int32). `TRANSPOSE_4X4`: within each 16, xq in the order of Q2_K's
    2-bit fields (position 4 j + b holds element 4 b + j: byte b of a word's field j). A group holding an infinity
    or a NaN gets the scale NaN and zeros, so that the outputs it reaches are NaN, as the float kernels' would be
    NaN or infinite, not finite garbage. Each program also zeroes its share of the GEMV's float32 y `[N]`, which a
    launch of its own would otherwise do."""
    n_per_program = tl.cdiv(N, tl.num_programs(0))
    n_end = tl.minimum((tl.program_id(0) + 1) * n_per_program, N)
    for n0 in range(tl.program_id(0) * n_per_program, n_end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        tl.store(y_ptr + n, tl.zeros((BLOCK,), dtype=tl.float32), mask=n < n_end)
    G: tl.constexpr = BLOCK // X_GROUP
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.reshape(tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32), (G, X_GROUP))
    exponents = tl.abs(x).to(tl.int32, bitcast=True) >> 23  # 255: infinite or NaN
    exponent = tl.max(exponents, axis=1)
    shift = x_shift(exponent)[:, None]
    q = tl.floor(x * power_of_two(shift) + 0.5)
    q = tl.minimum(q, 32767.0)  # a float32 x just below 2^15 rounds up to it
    xq = tl.where(exponent[:, None] < 255, q, 0.0).to(tl.int32)
    scale = tl.where(exponent < 255, power_of_two(-tl.reshape(shift, (G,))), float("nan"))
    group = tl.program_id(0) * G + tl.arange(0, G)
    tl.store(scale_ptr + group, scale, mask=group < K // X_GROUP)
    xq = tl.reshape(xq, (BLOCK // 16, 16))
    g = tl.program_id(0) * (BLOCK // 16) + tl.arange(0, BLOCK // 16)
    tl.store(sum_ptr + g, tl.sum(xq, axis=1), mask=g < K // 16)
    if TRANSPOSE_4X4:
        xq = transpose_4x4(xq)
    tl.store(xq_ptr + k, tl.reshape(xq, (BLOCK,)).to(tl.int16), mask=k < K)


@triton.jit
def _split_pairs(xp, G: tl.constexpr):
    """`[G, 4]` -> its 4 columns, each `[1, G]`."""
    a, b = tl.split(tl.reshape(xp, (G, 2, 2)))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0[None, :], b0[None, :], a1[None, :], b1[None, :]


@triton.jit
def _x_pairs(xq_ptr, k0, K, n_mask, BLOCK_K: tl.constexpr):
    """The tile's xq two a 32-bit word, `[BLOCK_K // 2]` (zeros past K unless `n_mask` is None)."""
    p = _first(k0, 2) + tl.arange(0, BLOCK_K // 2)
    return _load(xq_ptr.to(tl.pointer_type(tl.int32)) + p, None if n_mask is None else p < K // 2)


@triton.jit
def _dot4(first, second, codes, acc):
    """acc + 4 codes (the bytes of `codes`) times their xq, the pairs `first` (bytes 0, 1) and `second` (2, 3)."""
    return dot2(second, codes, dot2(first, codes, acc, False), True)


@triton.jit
def _field(words, third, J: tl.constexpr):
    """Field J (bits 2 J, 2 J + 1) of each byte of `words` as a byte; unless `third` is None, with bit J of each
    byte of `third` at its bit 2."""
    if J == 0:
        codes = words & 0x03030303
    else:
        codes = shift_right(words, 2 * J) & 0x03030303
    if third is not None:
        if J < 2:
            third = third << (2 - J)
        elif J == 3:
            third = shift_right(third, 1)
        codes = codes | (third & 0x04040404)
    return codes


@triton.jit
def _field_dots(xq_ptr, k0, K, n_mask, words, third, BLOCK_K: tl.constexpr):
    """The sum over each 16 elements of code times xq, `[BLOCK_N, BLOCK_K // 16]` int32, for words of 16 2-bit
    codes (field j of byte b: element 4 b + j) with, unless `third` is None, their third bits (byte b: elements
    4 b .. 4 b + 3), against xq in `quantize_x_kernel`'s transposed order: 8 dp2a."""
    G: tl.constexpr = BLOCK_K // 16
    low, high = tl.split(tl.reshape(_x_pairs(xq_ptr, k0, K, n_mask, BLOCK_K), (G, 4, 2)))  # field j's pairs
    l0, l1, l2, l3 = _split_pairs(low, G)
    h0, h1, h2, h3 = _split_pairs(high, G)
    dots = _dot4(l0, h0, _field(words, third, 0), tl.zeros_like(words))
    dots = _dot4(l1, h1, _field(words, third, 1), dots)
    dots = _dot4(l2, h2, _field(words, third, 2), dots)
    return _dot4(l3, h3, _field(words, third, 3), dots)


@triton.jit
def _q2_k_sums(xq_ptr, scale_ptr, sum_ptr, w_ptr, rows, n_mask, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum over each 32 of W[n, k] x[k] for the tile at k0, `[BLOCK_N, BLOCK_K // 32]` fp32, of a Q2_K weight in
    planes (scales: a byte each, scale | min << 4 | qs: 2-bit codes | d | dmin): each 16-element sub-block's codes
    times xq (`_field_dots`), times its integer scale; its min times the sum of its xq."""
    G: tl.constexpr = BLOCK_K // 16
    nb = K // 256
    codes_plane = _plane_bytes(nb, 16)
    d_plane = codes_plane + _plane_bytes(nb, 64)
    words = _code_words(w_ptr, rows + codes_plane, k0, K, n_mask, 16, BLOCK_K)
    dots = _field_dots(xq_ptr, k0, K, n_mask, words, None, BLOCK_K)
    t = (_first(k0, 16) + tl.arange(0, G))[None, :]
    packed = _load(w_ptr + rows + t, _within(n_mask, t, K // 16)).to(tl.int32)
    scaled = tl.sum(tl.reshape(dots * (packed & 15), (BLOCK_N, G // 2, 2)), axis=2)
    mins = tl.sum(tl.reshape(tl.load(sum_ptr + t) * (packed >> 4), (BLOCK_N, G // 2, 2)), axis=2)
    s, _, s_mask = _sub_blocks(k0, K, n_mask, 32, BLOCK_K)
    x_scale = _x_scales(scale_ptr, k0, K, n_mask, BLOCK_K)
    return scaled.to(tl.float32) * (_k_quant_d(w_ptr, rows + d_plane, s, s_mask) * x_scale) - \
        mins.to(tl.float32) * (_k_quant_d(w_ptr, rows + d_plane + _plane_bytes(nb, 2), s, s_mask) * x_scale)


@triton.jit
def _q3_k_sums(xq_ptr, scale_ptr, sum_ptr, w_ptr, rows, n_mask, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q3_K's (hmask: third bits | qs: low 2 bits | 12 bytes of 6-bit scales | d) sums over each 32 of W[n, k] x[k],
    `[BLOCK_N, BLOCK_K // 32]` fp32. As Q2_K's, with each code's third bit merged into its byte: the planes hold
    the third bits of each 16 elements spread a nibble to a byte (`decode_planes.q3_k_third_bits`), field j's
    (element 4 b + j) at bit j of byte b. The codes are value + 4: the sub-block's sum of xq times 4 leaves once per
    sub-block."""
    G: tl.constexpr = BLOCK_K // 16
    nb = K // 256
    low_plane = _plane_bytes(nb, 32)
    scale_plane = low_plane + _plane_bytes(nb, 64)
    m = (_first(k0, 16) + tl.arange(0, G))[None, :]
    m_mask = _within(n_mask, m, K // 16)
    third = q3_k_third_bits(w_ptr, rows, k0, K, n_mask, BLOCK_K)
    dots = _field_dots(xq_ptr, k0, K, n_mask, _typed(w_ptr, rows + low_plane, m, m_mask, tl.int32), third, BLOCK_K)
    s, j, s_mask = _sub_blocks(k0, K, n_mask, 16, BLOCK_K)
    scale = _k3_scale_bits(w_ptr, rows + scale_plane, k0, s, j, s_mask, BLOCK_K) - (FLOAT_OF_TWO_POW_23 + 32)
    t = (_first(k0, 16) + tl.arange(0, G))[None, :]
    scaled = tl.sum(tl.reshape((dots - 4 * tl.load(sum_ptr + t)) * scale, (BLOCK_N, G // 2, 2)), axis=2)
    d = _k_quant_d(w_ptr, rows + scale_plane + _plane_bytes(nb, 12), s, s_mask)
    return scaled.to(tl.float32) * (d * _x_scales(scale_ptr, k0, K, n_mask, BLOCK_K))


@triton.jit
def _code_book_sums(xq_ptr, scale_ptr, w_ptr, rows, n_mask, k0, K, FMT: tl.constexpr, tables_ptr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """IQ4_NL's and IQ4_XS's sums over each 32 (a block, a sub-block) of W[n, k] x[k]: each word of 8 codes looked
    up as two words of int8 levels (`float_bits.iq4_int8_bytes`), multiplied by xq in element order, 4 dp2a; the
    block's float32 scale once per sum."""
    W: tl.constexpr = BLOCK_K // 8
    scale, plane = _code_book_scales(w_ptr, rows, k0, K, n_mask, FMT, BLOCK_K, True)
    scale = scale * _x_scales(scale_ptr, k0, K, n_mask, BLOCK_K)
    low, high = tl.split(iq4_int8_bytes(_code_words(w_ptr, rows + plane, k0, K, n_mask, 8, BLOCK_K), tables_ptr))
    p0, p1, p2, p3 = _split_pairs(tl.reshape(_x_pairs(xq_ptr, k0, K, n_mask, BLOCK_K), (W, 4)), W)
    dots = _dot4(p2, p3, high, _dot4(p0, p1, low, tl.zeros_like(low)))
    sums = tl.sum(tl.reshape(dots, (BLOCK_N, BLOCK_K // 32, 4)), axis=2)
    return sums.to(tl.float32) * scale


@triton.jit
def _x_scales(scale_ptr, k0, K, n_mask, BLOCK_K: tl.constexpr):
    """The tile's x scales `[1, BLOCK_K // X_GROUP]` (ones past K unless `n_mask` is None)."""
    g = _first(k0, X_GROUP) + tl.arange(0, BLOCK_K // X_GROUP)
    if n_mask is None:
        scales = tl.load(scale_ptr + g)
    else:
        scales = tl.load(scale_ptr + g, mask=g < K // X_GROUP, other=1.0)
    return scales[None, :]


@triton.jit
def int_sums(xq_ptr, scale_ptr, sum_ptr, w_ptr, tables_ptr, rows, n_mask, k0, K, FMT: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum over each 32 of W[n, k] x[k] for the tile at k0, `[BLOCK_N, BLOCK_K // 32]` fp32, from
    `quantize_x_kernel`'s xq, scales and sums."""
    if FMT == Q2_K:
        sums = _q2_k_sums(xq_ptr, scale_ptr, sum_ptr, w_ptr, rows, n_mask, k0, K, BLOCK_N, BLOCK_K)
    elif FMT == Q3_K:
        sums = _q3_k_sums(xq_ptr, scale_ptr, sum_ptr, w_ptr, rows, n_mask, k0, K, BLOCK_N, BLOCK_K)
    else:
        tl.static_assert((FMT == IQ4_NL) | (FMT == IQ4_XS), "int_sums: Q2_K, Q3_K, IQ4_NL or IQ4_XS")
        sums = _code_book_sums(xq_ptr, scale_ptr, w_ptr, rows, n_mask, k0, K, FMT, tables_ptr, BLOCK_N, BLOCK_K)
    return sums
