"""The Triton kernels against the numpy reference: without a GPU they run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), with one on CUDA tensors."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kernels import QTensor, dispatch, get_format, reference
from kernels import quant_linear as quant_linear_module
from kernels.quant_linear import METHODS, QuantLinear, quant_linear
from kernels.repack import has_planes
from kernels.triton.decode import FORMAT_IDS, KERNEL_FORMATS
from kernels.triton.decode_planes import FUSED, decode_planes_tile_as
from kernels.triton import ops
from kernels.triton.int_gemv import dot2
from kernels.triton.ops import (dequant_matmul_triton, dequantize_triton, interpreting, lookup_table, quantize_x,
                                quant_linear_triton)

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 72, 512  # N: not a multiple of any tile; K: two K-quant super-blocks, sixteen 32-element blocks
ODD_N = 37  # odd: the last N tile of every kernel is partial
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# every fused kernel (M = 1 the FMA GEMV, 3 the split-K, 17 and 64 the GEMM) in fp32 and fp16; bf16 (slow in the
# interpreter) on each
CASES = [(M, dtype) for M in (1, 3, 17, 64) for dtype in (torch.float32, torch.float16)] + \
    [(1, torch.bfloat16), (3, torch.bfloat16), (17, torch.bfloat16)]


def odd_k(fmt):
    """Three blocks: not a multiple of the interpreter's and the dequantize kernel's BLOCK_K (128) for 32- and
    64-element blocks, so the K masks are used (K-quants' 256-element blocks are a multiple of every tile)."""
    return 3 * get_format(fmt).block_size


PLANES_FORMATS = [fmt for fmt in KERNEL_FORMATS if has_planes(fmt)]


def quantized_weight(fmt, seed=0, n=N, k=K, layout="blocks"):
    """The weight quantized by the reference (repacked into `layout` on the device) and the reference's decoding."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    raw = reference.quantize(w, fmt)
    dense = torch.from_numpy(reference.dequantize(raw, fmt))  # the independent decoding
    weight = QTensor(torch.from_numpy(raw).to(DEVICE), fmt, (n, k))
    return (weight.planes() if layout == "planes" else weight), dense


@pytest.mark.parametrize("odd", [False, True], ids=["72x512", "odd"])
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_dequant_kernel_equals_reference(fmt, odd):
    weight, dense = quantized_weight(fmt, n=ODD_N, k=odd_k(fmt)) if odd else quantized_weight(fmt)
    assert torch.equal(dequantize_triton(weight, torch.float32).cpu(), dense)


def _check_fused(fmt, M, dtype, n, k, layout="blocks"):
    weight, dense = quantized_weight(fmt, seed=M, n=n, k=k, layout=layout)
    assert weight.layout == layout
    rng = np.random.default_rng(100 + M)
    x = torch.from_numpy(rng.standard_normal((M, k)).astype(np.float32))
    with_bias = M % 2 == 1  # bias on for M = 1, 3, 17
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    expected = x.double() @ dense.double().T + (bias.double() if with_bias else 0)
    y = quant_linear_triton(x.to(dtype).to(DEVICE), weight, None if bias is None else bias.to(dtype).to(DEVICE))
    assert y.dtype == dtype and y.shape == (M, n)
    error = (y.double().cpu() - expected).norm() / expected.norm()
    assert error <= TOLERANCE[dtype], float(error)


@pytest.mark.parametrize("M, dtype", CASES)
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_fused_matmul_equals_reference(fmt, M, dtype):
    _check_fused(fmt, M, dtype, N, K)


@pytest.mark.parametrize("M", [1, 3, 17])  # the FMA GEMV, the split-K and the GEMM kernel
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_fused_matmul_on_odd_shapes(fmt, M):
    _check_fused(fmt, M, torch.float32, ODD_N, odd_k(fmt))


@pytest.mark.parametrize("odd", [False, True], ids=["72x512", "odd"])
@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_planes_dequant_kernel_equals_reference(fmt, odd):
    weight, dense = quantized_weight(fmt, n=ODD_N, k=odd_k(fmt), layout="planes") if odd else \
        quantized_weight(fmt, layout="planes")
    assert torch.equal(dequantize_triton(weight, torch.float32).cpu(), dense)


@pytest.mark.parametrize("odd", [False, True], ids=["72x512", "odd"])
@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_planes_dequant_kernel_to_bf16_equals_reference(fmt, odd):
    """Decoding straight to bf16 (NF4 looks its weights up 16 elements of a block at a time) gives the reference's
    weights rounded to bf16, bit for bit: to nearest even on a GPU; Triton's interpreter truncates instead."""
    weight, dense = quantized_weight(fmt, n=ODD_N, k=odd_k(fmt), layout="planes") if odd else \
        quantized_weight(fmt, layout="planes")
    if interpreting():
        expected = (dense.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits zero
    else:
        expected = dense.to(torch.bfloat16)
    assert torch.equal(dequantize_triton(weight, torch.bfloat16).cpu(), expected)


@triton.jit
def _fused_tile_kernel(w_ptr, out_ptr, tables_ptr, N, K, row_bytes, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    w = decode_planes_tile_as(w_ptr, n * row_bytes, tl.program_id(1) * BLOCK_K, K, n < N, FMT, tables_ptr,
                              out_ptr.dtype.element_ty, FUSED, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + n * K + k, w, mask=(n < N) & (k < K))


def _fused_tiles(weight, dtype, block_k):
    """The weight decoded tile by tile as the fused kernels decode it (`decode_planes_tile_as`, FUSED)."""
    n, k = weight.shape
    out = torch.zeros((n, k), dtype=dtype, device=DEVICE)
    _fused_tile_kernel[(triton.cdiv(n, 16), triton.cdiv(k, block_k))](
        weight.raw, out, lookup_table(weight.device), n, k, weight.raw.shape[1], FMT=FORMAT_IDS[weight.format],
        BLOCK_N=16, BLOCK_K=block_k)
    return out.cpu()


@pytest.mark.parametrize("fmt", ["Q8_0", "IQ4_NL"])
def test_fused_decode_of_bytes_is_exact(fmt):
    """Q8_0's and IQ4_NL's bytes in the 128 form decode by one multiply-add to the reference's float32 weights
    (`decode_planes.decodes_by_multiply_add`)."""
    weight, dense = quantized_weight(fmt, n=ODD_N, k=odd_k(fmt), layout="planes")
    assert torch.equal(_fused_tiles(weight, torch.float32, 128), dense)


@pytest.mark.parametrize("block_k", [64, 128])
@pytest.mark.parametrize("fmt", ["NF4", "IQ4_NL", "IQ4_XS"])
def test_code_book_bf16_tiles_of_the_fused_kernels(fmt, block_k):
    """The tensor-core kernels' bf16 decode of the code-book formats (`decode_planes_tile_as`; NF4's blocks whole in
    a thread in 128-deep tiles), which the interpreter's fused kernels skip (they multiply bf16 activations as
    fp32): the reference's weights in bf16, on odd shapes."""
    weight, dense = quantized_weight(fmt, n=ODD_N, k=odd_k(fmt) if fmt != "IQ4_XS" else 512, layout="planes")
    if interpreting():
        expected = (dense.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # truncated, as above
    else:
        expected = dense.to(torch.bfloat16)
    assert torch.equal(_fused_tiles(weight, torch.bfloat16, block_k), expected)


@pytest.mark.parametrize("M, dtype", [(1, torch.float16), (3, torch.float32), (17, torch.float16),
                                      (64, torch.float32)])
@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_planes_fused_matmul_equals_reference(fmt, M, dtype):
    _check_fused(fmt, M, dtype, N, K, layout="planes")
    _check_fused(fmt, M, dtype, ODD_N, odd_k(fmt), layout="planes")


@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_planes_gemv_stays_float32_accurate_with_outlier_activations(fmt):
    """The M = 1 kernel sums the 128 form's products (`qmatmul._gemv_sub_block_sums`), whose rounding follows
    sum(|x|) rather than the result: with a few activations 300 times the rest (as Flux's have), it must stay far
    below the bf16 output's own rounding (2^-9), at float32 accumulation's scale: about 1e-6. The integer dot
    products (`ops.INT_DOT_FORMATS`) round x to 2^-15 of the largest in its group of 32, which an outlier makes
    coarse for the other 31: 6-8e-5 here (2-5e-6 without outliers; `test_int_dot_gemv_within_its_bound`)."""
    weight, dense = quantized_weight(fmt, n=ODD_N, k=1024, layout="planes")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    x[0, rng.integers(0, 1024, 8)] *= 300
    x = torch.from_numpy(x).to(torch.bfloat16).float()  # products with bf16 inputs are exact in the 128 form
    exact = x.double() @ dense.double().T
    y = quant_linear_triton(x.to(DEVICE), weight, None).double().cpu()
    assert (y - exact).norm() / exact.norm() <= (1e-4 if fmt in ops.INT_DOT_FORMATS else 2e-5)


def _activations_with_outliers(k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, rng.integers(0, k, 8)] *= 300
    x[0, 64:96] = 0  # a group of zeros
    x[0, 96:128] *= 2.0**-130  # and of subnormals
    return torch.from_numpy(x).to(torch.bfloat16).float()


@pytest.mark.parametrize("fmt", ["Q2_K", "IQ4_NL"])
def test_quantize_x(fmt):
    """x -> 16-bit integers by a power of two per 32: the largest in [2^14, 2^15) (groups below 2^-112, the
    smallest scale's range, aside), bf16 values within 2^7 of it exact, the others within half a step; sums per 16;
    Q2_K's order transposed within each 16; the GEMV's y zeroed."""
    x = _activations_with_outliers(1024, 1)
    xq, scales, sums, y = (t.cpu() for t in quantize_x(x.to(DEVICE), fmt, ODD_N))
    assert xq.dtype == torch.int16 and scales.shape == (32,) and sums.shape == (64,)
    assert torch.equal(y, torch.zeros(1, ODD_N))
    if fmt == "Q2_K":
        xq = xq.view(64, 4, 4).transpose(1, 2)
    xq = xq.reshape(32, 32).double()
    groups = x.reshape(32, 32).double()
    assert torch.equal(torch.frexp(scales)[0].abs(), torch.full((32,), 0.5, dtype=torch.float32))
    largest = xq.abs().amax(dim=1)
    assert ((largest >= 2**14) & (largest < 2**15) | (groups.abs().amax(dim=1) < 2**-112)).all()
    error = (xq * scales.double()[:, None] - groups).abs()
    exact = (groups.abs() >= groups.abs().amax(dim=1, keepdim=True) / 2**7) & (groups.abs() >= 2**-112)
    assert (error[exact] == 0).all() and (error <= scales.double()[:, None] / 2).all()
    assert torch.equal(sums, xq.reshape(64, 16).sum(dim=1).to(torch.int32))


def test_quantize_x_passes_infinities_and_nans_on():
    """A group of x holding an infinity or a NaN gets the scale NaN (its xq zeros), so the integer GEMV's outputs
    are NaN where the float kernels' would be infinite or NaN, not finite."""
    x = torch.ones(1, 256)
    x[0, 3], x[0, 200] = float("inf"), float("nan")
    xq, scales, _, _ = (t.cpu() for t in quantize_x(x.to(DEVICE), "IQ4_NL", ODD_N))
    assert torch.isnan(scales[[0, 6]]).all() and torch.isfinite(scales[[1, 2, 3, 4, 5, 7]]).all()
    assert (xq[:32] == 0).all() and (xq[192:224] == 0).all() and (xq[32:64] != 0).all()
    weight, _ = quantized_weight("IQ4_NL", n=ODD_N, k=256, layout="planes")
    assert torch.isnan(quant_linear_triton(x.to(DEVICE), weight, None).cpu()).all()


def _operand_columns(per_word, depth=128):
    """Where the tensor cores' A operand takes each column of a `depth`-deep tile of words of `per_word` elements
    from, as `decode_planes.in_operand_order` promises: lane q of a quad holds columns 2 q, 2 q + 1, 2 q + 8, 2 q + 9
    of each 16 and takes its words (depth / 4 / per_word of them) whole."""
    words = depth // 4 // per_word
    source = np.empty(depth, dtype=np.int64)
    for q in range(4):
        for h in range(words):
            for element in range(per_word):
                j, i = divmod(element, 4)
                column = 16 * (per_word // 4 * h + j) + 8 * (i // 2) + 2 * q + i % 2
                source[column] = per_word * (words * q + h) + element
    return source


@pytest.mark.parametrize("fmt", ["IQ4_NL", "NF4", "Q2_K", "Q3_K"])
def test_split_k_x(fmt):
    """The split-K kernel's x for bf16 activations (`qmatmul.split_k_x_kernel`), per row and K split: for IQ4's f16
    weights x times the power of two that takes the split's largest |x| into [2^14, 2^15), in f16, and for NF4's
    level tiles the same with each 64 in the tensor cores' operand order (`_operand_columns`); for Q3_K's
    integer tiles x in 4 x 4 transposed order, for Q2_K's x in theirs, over their factors, then each 128 in the
    tensor cores' operand order (`_operand_columns`), and Q2_K's sums over each 16 as bf16 high and low parts that
    hold them to 2^-16 (2^-14 here: the interpreter truncates float32 to bf16, where GPUs round), sub-block 2 q +
    h's at columns 8 h + 2 q of each 16; and y zeroed. Rows of any scale, a split with smaller values than the
    others, a last split shorter than the rest."""
    rng = np.random.default_rng(7)
    k, splits, k_per_split, n = 1280, 3, 512, ODD_N
    x = rng.standard_normal((3, k)) * np.array([1e-20, 1.0, 1e30])[:, None]
    x[:, k_per_split:2 * k_per_split] *= 2.0**-20
    x = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    x_operand, shifts, sums, y = (t.cpu() for t in ops.split_k_x(x.to(DEVICE), fmt, n, splits, k_per_split))
    assert torch.equal(y, torch.zeros(3, n))
    if fmt in ("IQ4_NL", "NF4"):
        assert x_operand.dtype == torch.float16 and shifts.shape == (3, splits)
        for split in range(splits):
            part = slice(split * k_per_split, (split + 1) * k_per_split)
            scaled = x[:, part].double() * 2.0 ** shifts[:, split].double()[:, None]
            largest = scaled.abs().amax(dim=1)
            assert ((largest >= 2**14) & (largest < 2**15)).all()
            expected = scaled.half()
            if fmt == "NF4":
                expected = expected.view(3, -1, 64)[:, :, _operand_columns(8, 64)].reshape(3, -1)
            assert torch.equal(x_operand[:, part], expected)
        return
    if fmt == "Q3_K":
        transposed = x.view(3, -1, 4, 4).transpose(2, 3).reshape(3, -1, 128)
        assert torch.equal(x_operand, transposed[:, :, _operand_columns(32)].reshape(3, k))
        return
    # position 4i + 2c + h: element 4 (c + 2h) + i over 4^min(i, 2), as `float_bits.two_bit_ints`' weights go
    fields = x.view(3, -1, 2, 2, 4).permute(0, 1, 4, 3, 2) / torch.tensor([1, 4, 16, 16]).view(4, 1, 1)
    assert torch.equal(x_operand, fields.reshape(3, -1, 128)[:, :, _operand_columns(16)].reshape(3, k))
    groups = x.double().view(3, -1, 16)
    exact = groups.sum(dim=2)
    sub_blocks = np.array([8 * h + 2 * q for q in range(4) for h in range(2)])  # of sub-blocks 0-7
    high, low = sums.double().view(3, -1, 16)[:, :, sub_blocks[:, None] + [0, 1]].reshape(3, -1, 2).unbind(2)
    assert ((high + low - exact).abs() <= 2.0**-14 * exact.abs() + 2.0**-20 * groups.abs().sum(dim=2)).all()
    assert (low.abs() <= 2.0**-7 * high.abs()).all()


@triton.jit
def _dot2_kernel(x_ptr, codes_ptr, acc_ptr, out_ptr, HIGH: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, dot2(tl.load(x_ptr + i), tl.load(codes_ptr + i), tl.load(acc_ptr + i), HIGH))


@pytest.mark.parametrize("high", [False, True])
def test_dot2(high):
    """`int_gemv.dot2` (the portable twin here, dp2a on a GPU) against signed 16-bit halves times signed bytes."""
    rng = np.random.default_rng(3)
    x = np.concatenate([[0x7FFF8000, -1, 0x80007FFF - 2**32], rng.integers(-2**31, 2**31, 61)]).astype(np.int32)
    codes = np.concatenate([[0x7F80FF01, -0x7F7F7F80, 0x7F7F7F7F], rng.integers(-2**31, 2**31, 61)]).astype(np.int32)
    acc = rng.integers(-2**20, 2**20, 64).astype(np.int32)
    out = torch.empty(64, dtype=torch.int32, device=DEVICE)
    _dot2_kernel[(1,)](*(torch.from_numpy(a).to(DEVICE) for a in (x, codes, acc)), out, HIGH=high, BLOCK=64)
    halves = x.view(np.int16).reshape(64, 2).astype(np.int64)
    bytes_ = codes.view(np.int8).reshape(64, 4)[:, 2 * high:2 * high + 2].astype(np.int64)
    assert np.array_equal(out.cpu().numpy(), acc + (halves * bytes_).sum(axis=1))


@pytest.mark.parametrize("fmt", sorted(ops.INT_DOT_FORMATS))
def test_int_dot_gemv_within_its_bound(fmt):
    """The integer GEMV's error is x's rounding (`quantize_x`) times the weights, and float32's: per output at most
    2^-15 max|x_g| sum|w| over each group g of 32 whose values are not all exact (every bf16 value within 2^7 of
    its group's largest is), plus 1e-6 sum|x w|."""
    weight, dense = quantized_weight(fmt, n=ODD_N, k=1024, layout="planes")
    x = _activations_with_outliers(1024, 7)
    exact = (x.double() @ dense.double().T)[0]
    y = quant_linear_triton(x.to(DEVICE), weight, None).double().cpu()[0]
    groups = x.reshape(32, 32).abs().double()
    largest = groups.amax(dim=1)
    rounded = (groups < largest[:, None] / 2**7) & (groups > 0)
    bound = (rounded * largest[:, None] * 2**-15).reshape(1, 1024) @ dense.double().abs().T
    bound = bound[0] + 1e-6 * (x.double().abs() @ dense.double().abs().T)[0]
    assert ((y - exact).abs() <= bound).all()


@pytest.mark.parametrize("block_k", [16, 32, 64])  # the GPU tiles: inside one block, one block, two blocks
@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_planes_kernels_on_the_gpu_tiles(fmt, block_k, monkeypatch):
    if not interpreting():
        pytest.skip("on a GPU the tiles above are the ones that run")
    from kernels.triton import ops

    monkeypatch.setattr(ops, "INTERPRETER_GEMM", dict(ops.INTERPRETER_GEMM, BLOCK_K=block_k))
    monkeypatch.setattr(ops, "INTERPRETER_SPLIT_K", dict(ops.INTERPRETER_SPLIT_K, BLOCK_K=block_k))
    for M in (2, 17):
        _check_fused(fmt, M, torch.float32, ODD_N, odd_k(fmt), layout="planes")


@pytest.mark.parametrize("layout", ["blocks", "planes"])
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_gemv_on_its_gpu_tile(fmt, layout, monkeypatch):
    """The M = 1 kernel with the tile it runs on a GPU for the layout (128 or 64 columns: several splits, tiles of
    whole 32-element blocks, tiles inside a K-quant super-block), on odd shapes and on eight K-quant super-blocks."""
    if not interpreting():
        pytest.skip("on a GPU the tiles above are the ones that run")
    if layout == "planes" and not has_planes(fmt):
        pytest.skip(f"{fmt} has no planes layout")
    from kernels.triton import ops

    tile = ops.GEMV_CONFIGS[layout]
    monkeypatch.setattr(ops, "INTERPRETER_GEMV", dict(BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"]))
    _check_fused(fmt, 1, torch.float32, ODD_N, odd_k(fmt), layout=layout)
    _check_fused(fmt, 1, torch.float16, N, 4 * K, layout=layout)


def test_nf4_with_bf16_activations_takes_the_tensor_core_kernel_at_m_1():
    from kernels.triton.ops import fused_kernel

    assert [fused_kernel(1, "NF4", "bf16"), fused_kernel(1, "NF4", "fp16"), fused_kernel(1, "Q4_K", "bf16"),
            fused_kernel(16, "Q4_K", "bf16"), fused_kernel(17, "NF4", "bf16")] == \
        ["split-k", "gemv", "gemv", "split-k", "gemm"]
    _check_fused("NF4", 1, torch.bfloat16, N, K, layout="planes")


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K"])
def test_split_k_kernel_with_4_bit_codes_four_bytes_a_register(fmt, monkeypatch):
    """The split-K kernel's decode as the mma.sync GPUs run it (`ops.split_k_form`: FUSED_BYTES, the 4-bit codes in
    the 128 form four bytes a register), on odd shapes and on whole tiles."""
    from kernels.triton import ops
    from kernels.triton.decode_planes import FUSED, FUSED_BYTES

    assert [ops.split_k_form(cc) for cc in (80, 86, 89, 90)] == [FUSED_BYTES] * 3 + [FUSED]
    monkeypatch.setattr(ops, "INTERPRETER_SPLIT_K_FORM", FUSED_BYTES)
    _check_fused(fmt, 3, torch.float16, ODD_N, odd_k(fmt), layout="planes")
    _check_fused(fmt, 16, torch.bfloat16, N, K, layout="planes")


@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_split_k_kernels_on_a_weight_their_tiles_divide(fmt, monkeypatch):
    """The M <= 16 kernels with their GPU tiles on a weight those divide (`EVEN`: no masked weight loads), in K
    splits of 3 tiles and a last one of 1 (2 N tiles: 16 splits wanted for 34 tiles)."""
    if not interpreting():
        pytest.skip("on a GPU the tiles above are the ones that run")
    from kernels.triton import ops

    gemv, split_k = ops.GEMV_CONFIGS["planes"], ops.split_k_config(fmt, "planes", "fp16", 90)
    monkeypatch.setattr(ops, "INTERPRETER_GEMV", {name: gemv[name] for name in ("BLOCK_N", "BLOCK_K")})
    monkeypatch.setattr(ops, "INTERPRETER_SPLIT_K", {name: split_k[name] for name in ("BLOCK_N", "BLOCK_M", "BLOCK_K")})
    for M, tile in ((1, gemv), (3, split_k)):
        n, k = 2 * tile["BLOCK_N"], 34 * tile["BLOCK_K"]
        assert ops.even_tiles("planes", n, k, tile)
        assert ops._split_k_grid(n, k, tile["BLOCK_N"], tile["BLOCK_K"], DEVICE) == ((2, 12), 3 * tile["BLOCK_K"])
        _check_fused(fmt, M, torch.float16, n, k, layout="planes")


def _half_weight_case(fmt, dtype, row_scales, x_row_scales, seed=0):
    """A planes weight of rows scaled by `row_scales` and x of rows scaled by `x_row_scales` for the split-K kernel's
    f16 weights (`ops.uses_half_weights`), on odd shapes; its output, the exact one and sum(|x w|) per output."""
    assert ops.uses_half_weights(fmt, "planes", ops.DTYPES[dtype][0])
    rng = np.random.default_rng(seed)
    k = 512 if fmt == "IQ4_XS" else odd_k(fmt)
    w = rng.standard_normal((len(row_scales), k)) * np.asarray(row_scales)[:, None]
    raw = reference.quantize(w.astype(np.float32), fmt)
    dense = torch.from_numpy(reference.dequantize(raw, fmt)).double()
    weight = QTensor(torch.from_numpy(raw).to(DEVICE), fmt, w.shape).planes()
    x = torch.from_numpy(rng.standard_normal((len(x_row_scales), k)) * np.asarray(x_row_scales)[:, None]).to(dtype)
    y = quant_linear_triton(x.to(DEVICE), weight, None).double().cpu()
    return y, x.double() @ dense.T, x.double().abs() @ dense.abs().T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["IQ4_NL", "IQ4_XS"])
def test_half_weights_keep_rows_of_any_scale(fmt, dtype):
    """f16 holds 2^-24 .. 65504; weights of rows from 1e-5 to 1e5 and bf16 x of rows from 1e-30 to 1e30 stay within
    the output's rounding plus 2^-10 of sum(|x w|): each row is scaled by a power of two into f16's range first
    (`qmatmul.qmv_kernel`). Unscaled, the small rows' weights would be f16 subnormals or zeros, the large ones'
    products infinite. With fp16 x, the output's own range bounds the case (and its resolution, 2^-24, the
    error)."""
    if dtype == torch.bfloat16:
        row_scales, x_row_scales, resolution = np.logspace(-5, 5, ODD_N), [1e-30, 1.0, 1e30], 0.0
    else:
        row_scales, x_row_scales, resolution = np.logspace(-5, 1, ODD_N), [1e-3, 1.0, 30.0], 2.0**-24
    y, exact, magnitude = _half_weight_case(fmt, dtype, row_scales, x_row_scales)
    assert ((y - exact).abs() <= 2.0**-8 * exact.abs() + 2.0**-10 * magnitude + resolution).all()


@pytest.mark.parametrize("odd", [False, True], ids=["whole tiles", "odd"])
@pytest.mark.parametrize("fmt", ["Q3_K", "Q2_K"])
def test_integer_tiles_multiply_the_reference_weights(fmt, odd, monkeypatch):
    """Q3_K's and Q2_K's split-K kernel with bf16 x (`ops.uses_int_tiles`): (code - 4) * (scale - 32) or code * scale
    in bf16 tiles times x, summed in float32 and scaled by d (Q2_K: less dmin times its mins times x's sums per
    sub-block, those as bf16 high and low parts), is the reference's float32 weights times x: within the bf16
    output's rounding and float32 sums' (2^-20 of sum(|x w|)), and nearly every output is the exact one rounded to
    bf16, which weights rounded to bf16 (off by up to 2^-9 each) miss for about 40% of them."""
    assert ops.uses_int_tiles(fmt, "planes", "bf16") and not ops.uses_int_tiles(fmt, "planes", "fp16")
    if odd:
        n, k = ODD_N, 512
    else:  # the GPU tile on a weight it divides: no masked loads, 3 tiles a split
        split_k = ops.split_k_config(fmt, "planes", "bf16", 90)
        monkeypatch.setattr(ops, "INTERPRETER_SPLIT_K", {name: split_k[name] for name in ("BLOCK_N", "BLOCK_M",
                                                                                           "BLOCK_K")})
        n, k = 2 * split_k["BLOCK_N"], 34 * split_k["BLOCK_K"]
    weight, dense = quantized_weight(fmt, n=n, k=k, layout="planes")
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((3, k)).astype(np.float32)).to(torch.bfloat16)
    y = quant_linear_triton(x.to(DEVICE), weight, None).double().cpu()
    exact = x.double() @ dense.double().T
    assert ((y - exact).abs() <= 2.0**-8 * exact.abs() + 2.0**-20 * (x.double().abs() @ dense.double().abs().T)).all()
    assert (y == exact.to(torch.bfloat16).double()).double().mean() >= 0.99


@pytest.mark.parametrize("odd", [False, True], ids=["whole tiles", "odd"])
def test_nf4_level_tiles_keep_11_bits_of_each_weight(odd, monkeypatch):
    """NF4's split-K kernel with bf16 x (`ops.uses_level_tiles`): f16 levels times NF4_LEVEL_SCALE in the tensor
    cores' operand order, x in f16 in the same order, each block's sums times its absmax, the whole divided by the
    scale. Each weight is the reference's to within f16's rounding of its level (2^-11 of it), so the float32 sums
    lie within 2^-11 of sum(|x w|) of the exact ones (and float32's 2^-20), and their error is 2^-12 - 2^-13 of the
    result's norm, where bf16 weights (the reference's rounded, as the other kernels take them) leave about 2^-9.
    Rows of x from 1e-30 to 1e30 (bf16's range) as well: f16 x is scaled by a power of two a row."""
    assert ops.uses_level_tiles("NF4", "planes", "bf16") and not ops.uses_level_tiles("NF4", "planes", "fp16")
    if odd:
        n, k = ODD_N, 4 * odd_k("NF4")
    else:  # the GPU tile on a weight it divides: no masked loads, 3 tiles a split
        split_k = ops.split_k_config("NF4", "planes", "bf16", 90)
        monkeypatch.setattr(ops, "INTERPRETER_SPLIT_K", {name: split_k[name] for name in ("BLOCK_N", "BLOCK_M",
                                                                                           "BLOCK_K")})
        n, k = 2 * split_k["BLOCK_N"], 34 * split_k["BLOCK_K"]
    weight, dense = quantized_weight("NF4", n=n, k=k, layout="planes")
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((4, k)) * np.array([1.0, 1e-30, 1e30, 3.0])[:, None]).to(torch.bfloat16)
    sums = ops.split_k_sums(x.to(DEVICE), weight, None).double().cpu()
    exact = x.double() @ dense.double().T
    assert ((sums - exact).abs() <= (2.0**-11 + 2.0**-20) * (x.double().abs() @ dense.double().abs().T)).all()
    bf16_weights = x.double() @ dense.to(torch.bfloat16).double().T
    error, bf16_error = ((s - exact).norm(dim=1) / exact.norm(dim=1) for s in (sums, bf16_weights))
    assert (error <= 2.0**-11).all() and (bf16_error >= 2.0**-10).all(), (error, bf16_error)


@pytest.mark.parametrize("fmt", ["IQ4_NL", "NF4"])
def test_half_x_passes_infinities_and_nans_on(fmt):
    """An infinity or a NaN in a row of x makes that row's outputs NaN or infinite, as the float kernels' would be,
    and leaves the other rows' alone (f16 weights, and NF4's level tiles)."""
    rng = np.random.default_rng(5)
    k = odd_k(fmt)
    weight, dense = quantized_weight(fmt, n=ODD_N, k=k, layout="planes")
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    x[0, 5], x[1, 7] = float("inf"), float("nan")
    y = quant_linear_triton(x.to(torch.bfloat16).to(DEVICE), weight, None).float().cpu()
    assert not y[0].isfinite().any() and y[1].isnan().all()
    exact = x[2].to(torch.bfloat16).double() @ dense.double().T
    assert ((y[2].double() - exact).norm() / exact.norm()) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("method", METHODS)
def test_one_contract_for_every_method(method, monkeypatch):
    """The README's call - bf16 activations, a file's F32 bias - gives x's dtype and the same numbers on every path."""
    if method != "torch" and not (interpreting() or DEVICE == "cuda"):
        pytest.skip("Triton methods need a GPU or TRITON_INTERPRET=1")
    monkeypatch.setattr(quant_linear_module, "quant_linear_method", lambda x, weight: method)
    weight, dense = quantized_weight("Q4_K")
    x = torch.randn(2, 3, K, dtype=torch.bfloat16).to(DEVICE)
    bias = torch.randn(N, dtype=torch.float32).to(DEVICE)
    y = quant_linear(x, weight, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, N)
    expected = x.double().cpu() @ dense.double().T + bias.double().cpu()
    assert (y.double().cpu() - expected).norm() / expected.norm() < TOLERANCE[torch.bfloat16]
    with pytest.raises(ValueError, match="bias must be"):
        quant_linear(x, weight, torch.zeros(N + 1))
    with pytest.raises(ValueError, match="one device"):
        quant_linear(x, QTensor(weight.raw.to("meta"), weight.format, weight.shape))


def test_quant_linear_dispatch_and_module():
    weight, dense = quantized_weight("Q4_K")
    x = torch.randn(2, 5, K).to(DEVICE)  # leading dims are kept
    bias = torch.randn(N).to(DEVICE)
    layer = QuantLinear(weight, bias)
    y = layer(x)
    assert y.shape == (2, 5, N)
    expected = x.double().cpu() @ dense.double().T + bias.double().cpu()
    assert (y.double().cpu() - expected).norm() / expected.norm() < 1e-3
    with pytest.raises(ValueError, match="does not match"):
        quant_linear(torch.randn(3, K + 1).to(DEVICE), weight)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        quant_linear(torch.ones(3, K, dtype=torch.float64).to(DEVICE), weight)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0", "NF4"])
def test_dequantize_into_scratch_then_matmul(fmt):
    weight, dense = quantized_weight(fmt)
    x = torch.randn(5, K)
    bias = torch.randn(N)
    y = dequant_matmul_triton(x.to(DEVICE), weight, bias.to(DEVICE))
    expected = x.double() @ dense.double().T + bias.double()
    assert (y.double().cpu() - expected).norm() / expected.norm() < 1e-3
    small, _ = quantized_weight("Q4_0")  # the scratch buffer is reused for a smaller weight
    assert dequant_matmul_triton(x.to(DEVICE), small, None).shape == (5, N)


def test_quant_linear_follows_the_measured_dispatch_table(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dispatch, "SHIPPED_DIR", tmp_path / "shipped")
    dispatch.load_table.cache_clear()
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "fake-gpu-80gb.json").write_text(
        '{"device": "Fake GPU 80GB", "source": "shipped", "methods": {"Q4_K@1": "dequant_matmul", "Q4_K@16": "fused"}}')
    path = dispatch.write_table("Fake GPU 80GB", {"Q4_K@16": "dequant_matmul", "Q4_K@512": "fused"}, "test")
    assert path == tmp_path / "cache" / "flux-quant-engine" / "dispatch" / "fake-gpu-80gb.json"
    # buckets: M=1 -> 1 (shipped entry), 3 and 16 -> 16 (the user's entry wins), 17 -> 512, 9000 -> 4096 (no entry)
    assert [dispatch.method("Q4_K", M, "Fake GPU 80GB") for M in (1, 3, 16, 17, 9000)] == [
        "dequant_matmul", "dequant_matmul", "dequant_matmul", "fused", "dequant_matmul"]
    # without an entry, the static model's default: the fused GEMV up to M = 16, dequantize + matmul above
    assert [dispatch.method("Q8_0", M, "Fake GPU 80GB") for M in (1, 16, 17, 4608)] == [
        "fused", "fused", "dequant_matmul", "dequant_matmul"]
    assert dispatch.method("Q4_K", 512, "Unmeasured GPU") == "dequant_matmul"
    with pytest.raises(ValueError, match="unknown dispatch methods"):
        dispatch.write_table("Fake GPU 80GB", {"Q4_K@16": "cublas"}, "test")
    dispatch.load_table.cache_clear()

    weight, dense = quantized_weight("Q4_K")
    calls = []
    monkeypatch.setattr(dispatch, "method_for", lambda fmt, M, device: calls.append((fmt, M)) or "dequant_matmul")
    x = torch.randn(4, K).to(DEVICE)
    y = quant_linear(x, weight)
    assert calls == [("Q4_K", 4)]
    expected = x.double().cpu() @ dense.double().T
    assert (y.double().cpu() - expected).norm() / expected.norm() < 1e-3


@pytest.mark.parametrize("M", [1, 3, 17])
def test_activations_at_any_address_and_stride(M):
    """The kernels read x's rows at stride K from a 16-byte aligned start: a view that starts elsewhere or strides
    otherwise is copied first, and gives the same result."""
    weight, dense = quantized_weight("Q4_K", layout="planes")
    rng = np.random.default_rng(M)
    wide = torch.from_numpy(rng.standard_normal((M, 2 * K + 1)).astype(np.float32)).to(DEVICE)
    expected = wide[:, 1:K + 1].double().cpu() @ dense.double().T
    for x in (wide[:, 1:K + 1], wide[:, 1::2][:, :K]):  # misaligned start; a column stride of 2
        y = quant_linear_triton(x, weight, None).double().cpu()
        if x.stride(1) == 2:
            expected = x.double().cpu() @ dense.double().T
        assert (y - expected).norm() / expected.norm() < 1e-3


def test_misaligned_planes_are_refused():
    """The planes decoder's typed loads need the bytes at a multiple of 4."""
    weight, _ = quantized_weight("Q8_0", n=4, k=64, layout="planes")
    buffer = torch.zeros(weight.raw.numel() + 2, dtype=torch.uint8, device=weight.device)
    shifted = buffer[2:].view(weight.raw.shape)
    shifted.copy_(weight.raw)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        dequantize_triton(QTensor(shifted, "Q8_0", weight.shape, layout="planes"), torch.float32)
