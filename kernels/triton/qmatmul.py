"""Fused dequant-matmul kernels: `y = x @ W.T (+ bias)` with W read in its stored format.

* `qmm_kernel`: tensor-core GEMM for large M, `Y = X @ W.T` with the decoded weight tile as the right `tl.dot`
  operand: it goes to shared memory once (a 128-bit store per 8 elements), from where the tensor cores read it. As
  the left operand, the register operand of Hopper's wgmma, it took more instructions to shuffle into that operand's
  register layout (sm_90, per decoded element: Q8_0 11.3 -> 10.1, Q4_K 11.3 -> 10.3; sm_89 Q8_0 34.0 -> 21.5).
* `gemv_kernel`: M = 1 (Flux's modulation linears run at M = batch): on the FMA units, one multiply-add per weight
  element into fp32 partial sums (planes: the code values times x, summed per sub-block and scaled once; blocks: the
  decoded weights times x), reduced once at the end; split-K over the weight so enough programs stream it, partial
  sums meeting in an fp32 buffer with atomic adds. The formats with the fewest bits an element sum integer dot
  products of x rounded to 16 bits and their codes as bytes instead, two an instruction (`int_gemv`,
  `ops.INT_DOT_FORMATS`).
* `qmv_kernel`: the same split-K for 1 < M <= 16 on the tensor cores (M padded to 16): one decode for every row,
  where the FMA kernel would decode the weight once per row; IQ4's integer levels there as f16 weights
  (`ops.HALF_WEIGHT_FORMATS`), Q3_K's and Q2_K's codes times sub-block scales as bf16 integers
  (`ops.INT_TILE_FORMATS`), NF4's levels as f16 tiles scaled per block (`ops.LEVEL_TILE_FORMATS`); for those with
  bf16 x, `split_k_x_kernel` first makes the x they multiply, once.
* `dequant_kernel`: format -> dense tensor, for "dequantize into a scratch buffer + torch.matmul".

Each reads the weight in either layout (`PLANES`: `kernels/repack.py`). The split-K kernels load without masks
where their tiles divide the weight (`EVEN`, Flux's layers), and the tensor-core kernels decode codes below 128 in
the 128 form, one multiply-add an element (`decode_planes_tile`).
"""

import triton
import triton.language as tl

from kernels.triton.decode import NF4, Q2_K, Q3_K, decode_tile
from kernels.triton.decode_planes import (EXACT, FUSED, code_offset, code_step, decode_planes_parts,
                                          decode_planes_tile_as, has_biased_form, has_offset, iq4_half_tile,
                                          in_operand_order, iq4_row_shifts, nf4_level_tile, q2_k_int_tiles,
                                          q3_k_int_tile, q3_k_scale_bits, sub_block_pairs_in_operand_order,
                                          sub_block_size)
from kernels.triton.float_bits import NF4_LEVEL_SCALE, in_two_bit_order, power_of_two, two_bit_factors
from kernels.triton.int_gemv import int_sums, transpose_4x4, x_shift

LEVEL_TILES_UNSCALED = tl.constexpr(1.0 / NF4_LEVEL_SCALE)  # `qmv_kernel`'s LEVEL_TILES


@triton.jit
def _weight_tile(w_ptr, rows, k0, K, n_mask, FMT: tl.constexpr, PLANES: tl.constexpr, tables_ptr,
                 DTYPE: tl.constexpr, FORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight tile in DTYPE. `FORM` (`decode_planes_tile`) EXACT: the reference's weights bit for bit, as the
    dequantize kernel gives them; the fused kernels take a decode that may differ in the last bit (FUSED,
    FUSED_BYTES)."""
    if PLANES:
        w = decode_planes_tile_as(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, DTYPE, FORM, BLOCK_N, BLOCK_K)
    else:
        k = (k0 + tl.arange(0, BLOCK_K))[None, :]
        w = decode_tile(w_ptr, rows, k, n_mask & (k < K), FMT, tables_ptr).to(DTYPE)
    return w


@triton.jit
def _known_multiples(K, row_bytes, PLANES: tl.constexpr):
    """K and row_bytes, rewritten so the compiler sees the multiples they always are: every quantized format's block
    holds 32 elements or a multiple of 32, and planes rows are padded to 16 bytes (`kernels.repack`). Triton's JIT
    marks a size that happens to be a multiple of 16 on its own; this makes it hold for every shape, so an odd N or M
    does not cost the weight's vector loads (unmarked, the 64-deep GEMM tile spills)."""
    K = K // 32 * 32
    if PLANES:
        row_bytes = row_bytes // 16 * 16
    return K, row_bytes


@triton.jit
def qmm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, tables_ptr, M, N, K, row_bytes, stride_ym,
               FMT: tl.constexpr, PLANES: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    K, row_bytes = _known_multiples(K, row_bytes, PLANES)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: consecutive programs share weight tiles while they sit in L2
    group = pid // (GROUP_N * num_m)
    first_n = group * GROUP_N
    group_size = min(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * num_m)) % group_size
    pid_m = (pid % (GROUP_N * num_m)) // group_size

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = n[:, None] * row_bytes
    n_mask = n[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        w = _weight_tile(w_ptr, rows, k0, K, n_mask, FMT, PLANES, tables_ptr, DOT_DTYPE, FUSED, BLOCK_N, BLOCK_K)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * K + k[None, :],
                    mask=(m[:, None] < M) & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _gemv_x(x_ptr, k0, K, n_mask, BLOCK_K: tl.constexpr):
    """x[k0 .. k0 + BLOCK_K] as fp32 (masked at K unless `n_mask` is None: the tile lies inside the weight)."""
    k = k0 + tl.arange(0, BLOCK_K)
    if n_mask is None:
        x = tl.load(x_ptr + k)
    else:
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _gemv_products(x_ptr, w_ptr, tables_ptr, rows, n_mask, k0, K, FMT: tl.constexpr, PLANES: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k] * x[k] for the tile at k0, `[BLOCK_N, BLOCK_K]` fp32."""
    w = _weight_tile(w_ptr, rows, k0, K, n_mask, FMT, PLANES, tables_ptr, tl.float32, FUSED, BLOCK_N, BLOCK_K)
    return w * _gemv_x(x_ptr, k0, K, n_mask, BLOCK_K)[None, :]


@triton.jit
def _split_in_8(t):
    """`[..., 2, 2, 2]` -> its 8 parts `[...]`, in element order (tl.split takes the last axis first)."""
    a, b = tl.split(t)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    e0, e4 = tl.split(a0)
    e2, e6 = tl.split(a1)
    e1, e5 = tl.split(b0)
    e3, e7 = tl.split(b1)
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def _dots_of_8(v, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum over j < 8 of v[n, 8q + j] * x[8q + j], `[BLOCK_N, BLOCK_K // 8]`: a multiply and seven multiply-adds in
    a chain. tl.sum reduces a thread's elements as a tree, a multiply and an add for every other element (sm_90,
    the FMA GEMV per element: Q4_0 4.00 -> 3.61, Q6_K 7.14 -> 6.88)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _split_in_8(tl.reshape(v, (BLOCK_N, BLOCK_K // 8, 2, 2, 2)))
    x0, x1, x2, x3, x4, x5, x6, x7 = _split_in_8(tl.reshape(x, (1, BLOCK_K // 8, 2, 2, 2)))
    s = v0 * x0
    s += v1 * x1
    s += v2 * x2
    s += v3 * x3
    s += v4 * x4
    s += v5 * x5
    s += v6 * x6
    s += v7 * x7
    return s


@triton.constexpr_function
def _sums_in_128_form(fmt: int) -> bool:
    """Whether the M = 1 kernel sums `fmt`'s codes in the 128 form: codes below 128 (128 + c). Q8_0's bytes would
    take it with 8 fewer bits below the codes' unit (128 + c / 256, `decode_planes.code_step`), a relative error of
    about 5e-5 instead of 1e-6, and it is memory-bound without it (`bench.sass`); IQ4, which took it, sums integer
    dot products now (`int_gemv`)."""
    return has_biased_form(fmt) and code_step(fmt) == 1


@triton.jit
def _gemv_sub_block_sums(x_ptr, w_ptr, tables_ptr, rows, n_mask, k0, K, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """Planes: sum over each sub-block of W[n, k] * x[k] for the tile at k0, `[BLOCK_N, sub-blocks]` fp32. The
    codes' values times x are summed first (one multiply-add an element), then scaled once per sub-block, where
    decoding the weight first costs a multiply more an element.

    Codes come in the 128 form (`_sums_in_128_form`), 128 + c for a stored code c (`float_bits`): its product with
    x is exact in float32, and sum((c - offset) x) = sum((128 + c) x) - (128 + offset) sum(x), so the offset leaves
    once per sub-block instead of a subtraction an element. The sum then carries float32 rounding of 128 sum(|x|)
    rather than of sum(|(c - offset) x|): a relative error of about 2^-17 of sum(|x|), far below the bf16 output's
    2^-9 (tests/test_triton_kernels.py measures it)."""
    QK: tl.constexpr = sub_block_size(FMT)
    BIASED: tl.constexpr = _sums_in_128_form(FMT)
    v, scale, offset = decode_planes_parts(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, BIASED, BLOCK_N, BLOCK_K)
    x = _gemv_x(x_ptr, k0, K, n_mask, BLOCK_K)
    dots = tl.sum(tl.reshape(_dots_of_8(v, x, BLOCK_N, BLOCK_K), (BLOCK_N, BLOCK_K // QK, QK // 8)), axis=2)
    if BIASED or has_offset(FMT):
        x_sums = tl.sum(tl.reshape(x, (BLOCK_K // QK, QK)), axis=1)[None, :]
    if BIASED:
        dots -= (128 + code_offset(FMT)) * x_sums
    sums = dots * scale
    if has_offset(FMT):
        sums += offset * x_sums
    return sums


@triton.jit
def gemv_kernel(x_ptr, x_scale_ptr, x_sum_ptr, w_ptr, bias_ptr, y_ptr, tables_ptr, N, K, row_bytes, k_per_split,
                FMT: tl.constexpr, PLANES: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                INT_DOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (fp32, zeroed) += W[n, ks] @ x[ks] for one (n-tile, K-split). No reduction inside the loop: one FMA per
    weight element into a tile of partial sums, summed over K once after it. `EVEN`: BLOCK_N divides N and BLOCK_K
    divides K (Flux's layers), so no weight load needs a mask (planes only). `INT_DOTS` (planes): x comes as
    `int_gemv.quantize_x_kernel` leaves it, 16-bit integers, their scales and sums (`x_scale_ptr`, `x_sum_ptr`,
    otherwise unused), and the sums are integer dot products (`int_gemv.int_sums`)."""
    tl.static_assert(PLANES or not EVEN, "the blocks decoder masks every load")
    K, row_bytes = _known_multiples(K, row_bytes, PLANES)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = n[:, None] * row_bytes
    if EVEN:
        n_mask = None
    else:
        n_mask = n[:, None] < N
    k_start = tl.multiple_of(split * k_per_split, BLOCK_K)  # k_per_split is a multiple of BLOCK_K
    k_end = tl.minimum(k_start + k_per_split, K)  # the last split may hold fewer tiles
    # the first tile's products start the partial sums, so they take the products' register layout: a tile zeroed
    # by tl.zeros gets a default layout, and every tile would be shuffled into it through shared memory
    if INT_DOTS:
        acc = int_sums(x_ptr, x_scale_ptr, x_sum_ptr, w_ptr, tables_ptr, rows, n_mask, k_start, K, FMT, BLOCK_N, BLOCK_K)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            acc += int_sums(x_ptr, x_scale_ptr, x_sum_ptr, w_ptr, tables_ptr, rows, n_mask, k0, K, FMT, BLOCK_N, BLOCK_K)
    elif PLANES:
        acc = _gemv_sub_block_sums(x_ptr, w_ptr, tables_ptr, rows, n_mask, k_start, K, FMT, BLOCK_N, BLOCK_K)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            acc += _gemv_sub_block_sums(x_ptr, w_ptr, tables_ptr, rows, n_mask, k0, K, FMT, BLOCK_N, BLOCK_K)
    else:
        acc = _gemv_products(x_ptr, w_ptr, tables_ptr, rows, n_mask, k_start, K, FMT, PLANES, BLOCK_N, BLOCK_K)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            acc += _gemv_products(x_ptr, w_ptr, tables_ptr, rows, n_mask, k0, K, FMT, PLANES, BLOCK_N, BLOCK_K)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.where(split == 0, tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32), 0.0)
    tl.atomic_add(y_ptr + n, y, mask=n < N)


@triton.jit
def _split_k_x(x_ptr, m, M, K, k0, EVEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """x's rows `m` (< M to exist), columns k0 .. k0 + BLOCK_K (masked at K unless `EVEN`)."""
    k = k0 + tl.arange(0, BLOCK_K)
    if EVEN:
        mask = m[:, None] < M
    else:
        mask = (m[:, None] < M) & (k[None, :] < K)
    return tl.load(x_ptr + m[:, None] * K + k[None, :], mask=mask, other=0.0)


@triton.jit
def _sub_block_sums_hi_lo(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x's float32 sums over each 16 columns, as bf16 pairs high, low (sum t at columns 2t, 2t + 1, 16 of them for a
    128-deep tile): their sum holds the float32 one to 16 significant bits, a 16-deep operand of the tensor cores,
    as `decode_planes.q2_k_int_tiles`' mins are (each twice)."""
    sums = tl.sum(tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_K // 16, 16)), axis=2)
    high = sums.to(tl.bfloat16)
    low = (sums - high.to(tl.float32)).to(tl.bfloat16)
    return tl.reshape(tl.join(high, low), (BLOCK_M, 2 * (BLOCK_K // 16)))


@triton.jit
def split_k_x_kernel(x_ptr, xo_ptr, x_shifts_ptr, x_sums_ptr, y_ptr, N, K, k_per_split, n_per_split,
                     FMT: tl.constexpr, HALF_X: tl.constexpr, BLOCK: tl.constexpr):
    """For one row of bf16 x and one K split of `qmv_kernel`: the x operand it multiplies where that is not x as
    given, made here once instead of by each of the split's programs (one an n-tile), and the split's share of the
    row of y zeroed for the split-K sums, which a launch of its own would otherwise do.

    `HALF_X` (f16 weights or level tiles): x times 2^shift in f16, exact down to 2^-28 of the largest, where the
    shift (`int_gemv.x_shift`, the row's per split at `x_shifts_ptr`) takes the split's largest |x| into
    [2^14, 2^15); for NF4's level tiles each 64 then in the tensor cores' operand order (`in_operand_order`, 8
    elements a word). Else (`INT_TILES`): x's columns in the order of the tiles': Q3_K's 4 x 4 transposed
    (`int_gemv.transpose_4x4`), Q2_K's `float_bits.in_two_bit_order` divided by `two_bit_factors` (powers of two:
    exact), then each 128 in the tensor cores' operand order (`decode_planes.in_operand_order`), and for Q2_K the
    sums of x over each 16 columns as bf16 high and low parts (`_sub_block_sums_hi_lo`, `K // 8` a row at
    `x_sums_ptr`, `sub_block_pairs_in_operand_order`)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_end = tl.minimum((split + 1) * n_per_split, N)
    for n0 in range(split * n_per_split, n_end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        tl.store(y_ptr + row * N + n, tl.zeros((BLOCK,), dtype=tl.float32), mask=n < n_end)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if HALF_X:
        top = tl.zeros((BLOCK,), dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * K + k, mask=k < k_end, other=0.0).to(tl.float32)
            top = tl.maximum(top, tl.abs(x).to(tl.int32, bitcast=True) >> 23)
        shift = x_shift(tl.max(top, axis=0))
        tl.store(x_shifts_ptr + row * tl.num_programs(1) + split, shift)
        for k0 in range(k_start, k_end, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * K + k, mask=k < k_end, other=0.0).to(tl.float32)
            x = (x * power_of_two(shift)).to(tl.float16)
            if FMT == NF4:
                x = tl.reshape(in_operand_order(tl.reshape(x, (BLOCK // 64, 64)), 8), (BLOCK,))
            tl.store(xo_ptr + row * K + k, x, mask=k < k_end)
    else:
        for k0 in range(k_start, k_end, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * K + k, mask=k < k_end, other=0.0)[None, :]
            if FMT == Q2_K:
                e = tl.arange(0, 16)[None, None, :]
                x_operand = in_two_bit_order((tl.reshape(x, (1, BLOCK // 16, 16)).to(tl.float32)
                                              / two_bit_factors(e)).to(x.dtype))
                x_operand = in_operand_order(tl.reshape(x_operand, (BLOCK // 128, 128)), 16)
            else:
                x_operand = in_operand_order(tl.reshape(transpose_4x4(x), (BLOCK // 128, 128)), 32)
            tl.store(xo_ptr + row * K + k, tl.reshape(x_operand, (BLOCK,)), mask=k < k_end)
            if FMT == Q2_K:
                s = k0 // 8 + tl.arange(0, BLOCK // 8)
                sums = tl.reshape(_sub_block_sums_hi_lo(x, 1, BLOCK), (BLOCK // 128, 16))
                sums = sub_block_pairs_in_operand_order(sums)
                tl.store(x_sums_ptr + row * (K // 8) + s, tl.reshape(sums, (BLOCK // 8,)), mask=s < k_end // 8)


@triton.jit
def _int_tile_dots(x_ptr, x_sums_ptr, w_ptr, tables_ptr, rows, n_mask, m, M, K, k0, products, min_products,
                   scale_bits, FMT: tl.constexpr, DOT_DTYPE: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Q3_K's or Q2_K's integer tile at k0, 128 deep (`decode_planes.q3_k_int_tile`, with its super-block's
    `scale_bits`; `q2_k_int_tiles`), times x, added to `products` (None: zero), unscaled, and Q2_K's mins times x's
    sums per sub-block likewise to `min_products`; and the tile's d and Q2_K's dmin (Q3_K: d again)."""
    if FMT == Q2_K:
        w, mins, d, dmin = q2_k_int_tiles(w_ptr, rows, k0, K, n_mask, tables_ptr, BLOCK_N, 128)
        sums = _split_k_x(x_sums_ptr, m, M, K // 8, k0 // 8, True, 16)
        min_products = tl.dot(mins.to(DOT_DTYPE), tl.trans(sums.to(DOT_DTYPE)), min_products, input_precision="ieee")
    else:
        w, d = q3_k_int_tile(w_ptr, rows, k0, K, n_mask, scale_bits, tables_ptr, BLOCK_N, 128)
        dmin = d
    x = _split_k_x(x_ptr, m, M, K, k0, EVEN, 128)
    products = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), products, input_precision="ieee")
    return products, min_products, d, dmin


@triton.jit
def qmv_kernel(x_ptr, x_shifts_ptr, x_sums_ptr, w_ptr, bias_ptr, y_ptr, tables_ptr, M, N, K, row_bytes, k_per_split,
               FMT: tl.constexpr, PLANES: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
               EVEN: tl.constexpr, FORM: tl.constexpr, HALF_WEIGHTS: tl.constexpr, X_SHIFTS: tl.constexpr,
               INT_TILES: tl.constexpr, LEVEL_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """y (fp32, zeroed) += x[:, ks] @ W[n, ks].T for one (n-tile, K-split). M <= BLOCK_M (16): the padded rows cost
    tensor-core work nobody waits for, since streaming the weight bounds the time. `EVEN`: as `gemv_kernel`'s.
    `FORM`: FUSED or FUSED_BYTES (`decode_planes`), which counts fewer on mma.sync GPUs.

    `HALF_WEIGHTS` (IQ4_NL, IQ4_XS in planes; fp16 or bf16 x): f16 operands. IQ4's levels are integers, so an f16
    weight takes one byte table and a permute into 1024 + level + 128 (`float_bits.iq4_half_weights`), where a bf16
    one takes two tables and a permute to pair their bytes. Before its loop the program finds each row's factors:
    a power of two that takes the weight row's largest |scale| over its columns into [2^7, 2^8) (no f16 weight
    overflows, none of the largest blocks' is subnormal); the sums lose it at the end. With `X_SHIFTS` (bf16 x), x
    comes as `split_k_x_kernel` makes it: in f16, each row times a power of two (`x_shifts_ptr`) the sums lose too.

    `INT_TILES` (Q3_K, Q2_K in planes, bf16 x): each tile's (code - 4) * (scale - 32) (Q3_K) or code * scale times
    1, 4 or 16 (Q2_K), bf16 integers (`decode_planes.q3_k_int_tile`, `q2_k_int_tiles`) decoded in the tensor cores'
    operand order, times x with its columns in the same order (and Q2_K's divided by the same factors), the sum
    scaled by the super-block's d; Q2_K's mins times x's sums per sub-block (bf16 high and low parts at
    `x_sums_ptr`), scaled by dmin, subtracted: the reference's float32 weights exactly. x and its sums come from
    `split_k_x_kernel`. BLOCK_K 128 (half a super-block) or 256 (`ops.SPLIT_K_DEPTHS`: d and dmin applied once).

    `LEVEL_TILES` (NF4 in planes; fp16 or bf16 x): f16 tiles of NF4's levels times a constant, NF4_LEVEL_SCALE
    (`decode_planes.nf4_level_tile`), two byte lookups and a sum a byte, where the bf16 weights take a table built
    per block and a select between its halves (`float_bits.nf4_half_levels`); each block's sums (a dot 64 deep)
    times its absmax, the whole divided by NF4_LEVEL_SCALE at the end: the weights to 11 significant bits of their
    levels, where bf16 keeps 8 of theirs. x as `HALF_WEIGHTS` takes it."""
    tl.static_assert(PLANES or not EVEN, "the blocks decoder masks every load")
    K, row_bytes = _known_multiples(K, row_bytes, PLANES)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    rows = n[:, None] * row_bytes
    if EVEN:
        n_mask = None
    else:
        n_mask = n[:, None] < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = tl.multiple_of(split * k_per_split, BLOCK_K)  # k_per_split is a multiple of BLOCK_K
    k_end = tl.minimum(k_start + k_per_split, K)
    if HALF_WEIGHTS:
        w_shift = iq4_row_shifts(w_ptr, rows, k_start, k_end, K, n_mask, FMT, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        # each tile's x loads after its weight is decoded: loaded first, it held registers through the decode and
        # the mma.sync GPUs' float decode counted more (sm_80, Q4_1: 4.66 against 4.83, Q8_0 4.31 against 4.45)
        if INT_TILES:
            scale_bits = None
            if FMT == Q3_K:
                scale_bits = q3_k_scale_bits(w_ptr, rows, k0, K, n_mask)
            products, min_products, d, dmin = _int_tile_dots(x_ptr, x_sums_ptr, w_ptr, tables_ptr, rows, n_mask, m, M,
                                                             K, k0, None, None, scale_bits, FMT, DOT_DTYPE, EVEN,
                                                             BLOCK_N)
            if BLOCK_K == 256:  # the super-block's other half, under the same d (and dmin, scale bits)
                products, min_products, _, _ = _int_tile_dots(x_ptr, x_sums_ptr, w_ptr, tables_ptr, rows, n_mask, m,
                                                              M, K, k0 + 128, products, min_products, scale_bits, FMT,
                                                              DOT_DTYPE, EVEN, BLOCK_N)
            acc += products * d
            if FMT == Q2_K:
                acc -= min_products * dmin
        elif LEVEL_TILES:
            tl.static_assert(BLOCK_K % 64 == 0, "whole blocks a tile")
            for block in tl.static_range(0, BLOCK_K, 64):
                w, absmax = nf4_level_tile(w_ptr, rows, k0 + block, K, n_mask, tables_ptr, BLOCK_N, 64)
                x = _split_k_x(x_ptr, m, M, K, k0 + block, EVEN, 64)
                acc += tl.dot(w, tl.trans(x.to(DOT_DTYPE)), input_precision="ieee") * absmax
        else:
            if HALF_WEIGHTS:
                w = iq4_half_tile(w_ptr, rows, k0, K, n_mask, FMT, tables_ptr, power_of_two(w_shift)[:, None],
                                  BLOCK_N, BLOCK_K)
            else:
                w = _weight_tile(w_ptr, rows, k0, K, n_mask, FMT, PLANES, tables_ptr, DOT_DTYPE, FORM, BLOCK_N,
                                 BLOCK_K)
            x = _split_k_x(x_ptr, m, M, K, k0, EVEN, BLOCK_K)
            acc = tl.dot(w, tl.trans(x.to(DOT_DTYPE)), acc, input_precision="ieee")
    if HALF_WEIGHTS:
        acc *= power_of_two(-w_shift)[:, None]
    if LEVEL_TILES:
        acc *= LEVEL_TILES_UNSCALED
    if X_SHIFTS:
        x_shifts = tl.load(x_shifts_ptr + m * tl.num_programs(1) + split, mask=m < M, other=0)
        acc *= power_of_two(-x_shifts)[None, :]
    if HAS_BIAS:
        acc += tl.where(split == 0, tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32), 0.0)[:, None]
    tl.atomic_add(y_ptr + m[None, :] * N + n[:, None], acc, mask=(m[None, :] < M) & (n[:, None] < N))


@triton.jit
def dequant_kernel(w_ptr, out_ptr, tables_ptr, N, K, row_bytes, FMT: tl.constexpr, PLANES: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    K, row_bytes = _known_multiples(K, row_bytes, PLANES)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    rows = n[:, None] * row_bytes
    n_mask = n[:, None] < N
    mask = n_mask & (k[None, :] < K)
    w = _weight_tile(w_ptr, rows, k0, K, n_mask, FMT, PLANES, tables_ptr, out_ptr.dtype.element_ty, EXACT, BLOCK_N,
                     BLOCK_K)
    tl.store(out_ptr + n[:, None].to(tl.int64) * K + k[None, :], w, mask=mask)
