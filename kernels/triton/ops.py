"""Launchers for the Triton kernels: tile configurations, the small-M / large-M choice, dtypes."""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from kernels import state
from kernels.qtensor import QTensor
from kernels.triton.decode import FORMAT_IDS
from kernels.triton.decode_planes import FUSED, FUSED_BYTES
from kernels.triton.float_bits import LOOKUP_WORDS
from kernels.triton.int_gemv import X_GROUP, quantize_x_kernel
from kernels.triton.qmatmul import dequant_kernel, gemv_kernel, qmm_kernel, qmv_kernel, split_k_x_kernel

SMALL_M = 16  # up to here the weight-streaming split-K kernels run: the FMA GEMV at M = 1, the tensor-core one above

# GEMM tiles per activation dtype, (BLOCK_N, BLOCK_M, BLOCK_K, GROUP_N, num_warps, num_stages): the ones that compile
# without register spills for every format on sm_80/86/89/90 (the per-element decode is register hungry, fp32 tiles
# twice so). tests/test_triton_compile.py checks a subset in CI, `python -m bench.compile_check` all of them. The
# first is 64 deep: a tile's scale loads, address arithmetic and pipeline waits spread over 4x the elements of a
# 16-deep one (sm_90, per decoded element: Q4_0 14.1 -> 8.9, Q4_K 21.6 -> 10.6); two stages, since three put NF4's
# blocks layout over the 99 KB of shared memory of sm_86 / sm_89.
HALF_CONFIGS = (
    (128, 128, 64, 8, 8, 2),
    (64, 128, 32, 8, 8, 3),
    (64, 64, 16, 8, 4, 4),
)
# fp32, per weight layout: two stages (with four, NF4's blocks and Q5_1's planes took 255 registers and spilled 8-40
# bytes). Planes: 32 rows of M (with 64, Q3_K's word-wise decode took 255 registers and spilled 48 bytes on sm_90;
# in 8 warps ptxas stopped at 80 registers and spilled 8-16 for Q4_K and Q6_K).
FP32_GEMM_CONFIGS = {"planes": ((64, 32, 16, 8, 4, 2),), "blocks": ((64, 64, 16, 8, 4, 2),)}
# Tried first on Hopper (sm_90) for half activations and planes weights: 256 rows of M a tile, so each decoded weight
# element feeds twice the tensor-core work of a 128-row tile and the decode's issue cost per FLOP halves (the
# throughput model then puts the fused GEMM at M = 4608 at the bf16 kernel's time). Its accumulator takes 128
# registers a thread: within wgmma's budget with the planes decoders, not on sm_80-89 (mma.sync) nor with the blocks
# decoders, where it spills.
WIDE_M_CONFIG = (128, 256, 64, 8, 8, 2)
# Tried next there: 128 deep, which spreads each iteration's pipeline bookkeeping (stage indices, barriers, masks:
# about 110 instructions a thread) over twice the elements (sm_90, per decoded element against 64 deep: Q5_0 9.0 ->
# 8.3, Q3_K 10.8 -> 10.0, NF4 10.6 -> 9.9). It takes 100-112 KB of shared memory and up to 220 registers: within
# sm_90's budget, not sm_86/89's shared memory, and on sm_80 it spills 140-260 bytes.
DEEP_K_CONFIG = (128, 128, 128, 8, 8, 2)
# 1 < M <= 16, per weight layout and activation dtype. Planes: 128 deep, which spreads each K step's scale loads and
# pipeline waits over 4x the elements of a 32-deep tile (sm_90, per element: Q4_0 10.8 -> 7.5, Q4_K 16.1 -> 8.4);
# one stage in 4 warps, as the FMA GEMV: with two, the pipeliner staged the weight's bytes through shared memory
# (cp.async, then a shared load per 16 bytes) before decoding them from registers anyway (Q4_0 7.55 -> 5.33, Q4_K
# 8.02 -> 5.72; 8 warps 5.73, 6.20). fp32 activations 32 deep there (64 spilled 28 bytes for Q8_0 on sm_86/89).
# Blocks: 32 deep, where deeper tiles spill (Q5_K, Q5_1, Q6_K, IQ4_XS); fp32 activations two stages there (three
# spilled 8 bytes for IQ4_XS on sm_90).
_SPLIT_K_BLOCKS = dict(BLOCK_N=128, BLOCK_M=SMALL_M, BLOCK_K=32, num_warps=8, num_stages=3)
_SPLIT_K_PLANES = dict(BLOCK_N=128, BLOCK_M=SMALL_M, BLOCK_K=128, num_warps=4, num_stages=1)
SPLIT_K_CONFIGS = {"planes": {"fp16": _SPLIT_K_PLANES, "bf16": _SPLIT_K_PLANES,
                              "fp32": dict(_SPLIT_K_PLANES, BLOCK_K=32)},
                   "blocks": {"fp16": _SPLIT_K_BLOCKS, "bf16": _SPLIT_K_BLOCKS,
                              "fp32": dict(_SPLIT_K_BLOCKS, num_stages=2)}}


# Planes formats whose split-K kernel runs in 8 warps, for which activation dtypes and on which architectures. Q3_K
# and Q2_K decode 16 elements an asm call (`float_bits`), and in 4 warps the decoded tile left a thread with elements
# too far apart in its registers for vector stores: 16-bit stores of every element to shared memory on the way to
# the tensor cores (sm_90 per element: Q3_K 7.27 against 6.23, Q2_K 5.73 against 4.66; Q3_K also spilled 12 bytes
# on sm_80). Their integer tiles (bf16 activations, `INT_TILE_FORMATS`), decoded in the operand's order, count fewer
# in 4 (sm_90 scheduler clocks an element, 256 deep: Q2_K 2.35 against 2.59, Q3_K 2.99 against 3.20; sm_80 2.60
# against 2.95, 3.16 against 3.39; at most 194 registers, no spills). In 4, NF4 with fp16 activations spilled 12
# bytes on sm_86/89 (with bf16 it takes level tiles and fits in 4), Q8_0 with fp32 activations 8
# bytes on sm_90 and, with its bytes in the 128 form, 28 on sm_80.
_ALL_ARCHS = (80, 86, 89, 90)
SPLIT_K_8_WARPS = {**{(fmt, dtype): _ALL_ARCHS for fmt in ("Q3_K", "Q2_K") for dtype in ("fp16", "fp32")},
                   ("NF4", "fp16"): (86, 89), ("Q8_0", "fp32"): (80, 90)}

# Planes formats whose split-K tile is deeper than SPLIT_K_CONFIGS', for which activation dtypes. The integer tiles
# (bf16 activations): a 256-deep tile is a whole super-block, whose d (and Q2_K's dmin) scale the sums once, and
# whose scale bytes Q3_K loads once (scheduler clocks a weight element against 128 deep, sm_90: Q2_K 2.55 -> 2.35,
# Q3_K 3.66 -> 3.20; sm_80: 2.87 -> 2.60, 3.66 -> 3.39).
SPLIT_K_DEPTHS = {("Q2_K", "bf16"): 256, ("Q3_K", "bf16"): 256}

# Formats (in planes) whose split-K kernel, for fp16 and bf16 activations, multiplies f16 weights
# (`qmatmul.qmv_kernel`'s HALF_WEIGHTS): IQ4's integer levels take one byte table and a permute an element pair,
# where bf16 weights take a table of the block's 16 weights, built per block, two lookups and a permute (scheduler
# clocks a weight element, sm_90: IQ4_NL 5.61 -> 4.12, IQ4_XS 5.92 -> 4.32; sm_80-89: 5.62 -> 4.27-4.28, 5.98-6.05
# -> 4.48; H100 model at M = 16, issue time over memory time: 1.04 -> 0.76, 1.16 -> 0.85). The weights keep 11
# significant bits where bf16 keeps 8; x is scaled into f16's range by a power of two a row (bf16 x: by
# `split_k_x`, once a call).
HALF_WEIGHT_FORMATS = frozenset({"IQ4_NL", "IQ4_XS"})


def uses_half_weights(fmt: str, layout: str, dtype_name: str) -> bool:
    """Whether the split-K kernel multiplies f16 weights for a `fmt` weight in `layout` and `dtype_name` x."""
    return layout == "planes" and fmt in HALF_WEIGHT_FORMATS and dtype_name != "fp32"


# Formats (in planes) whose split-K kernel, for bf16 activations, multiplies f16 tiles of their code book's levels
# and scales each block's sums (`qmatmul.qmv_kernel`'s LEVEL_TILES): NF4's levels (times a constant,
# `float_bits.NF4_LEVEL_SCALE`) take two byte lookups and a sum a byte from fixed tables (`float_bits.sum_tables`),
# where its bf16 weights took a table of the block's 16 built per block, two lookups and a select between the
# table's halves a byte; decoded in the tensor cores' operand order (`decode_planes.in_operand_order`, x in the same
# order from `split_k_x`). The weights keep 11 significant bits of their levels where bf16 keeps 8 of theirs.
# Scheduler clocks a weight element, 128 deep: sm_90 5.08 -> 3.73, sm_80 5.09 -> 4.02, sm_86/89 5.09 -> 4.15; H100
# model, issue time over memory time: M = 16 0.94 -> 0.69, M = 1 (`SPLIT_K_AT_M_1`) 0.98 -> 0.72. fp16 x keeps
# the float decode, whose f16 weights level * absmax are rounded once.
LEVEL_TILE_FORMATS = frozenset({"NF4"})


def uses_level_tiles(fmt: str, layout: str, dtype_name: str) -> bool:
    """Whether the split-K kernel multiplies level tiles for a `fmt` weight in `layout` and `dtype_name` x."""
    return layout == "planes" and fmt in LEVEL_TILE_FORMATS and dtype_name == "bf16"


def uses_half_x(fmt: str, layout: str, dtype_name: str) -> bool:
    """Whether the split-K kernel's operands are f16 (f16 weights or level tiles), x's too."""
    return uses_half_weights(fmt, layout, dtype_name) or uses_level_tiles(fmt, layout, dtype_name)


# Formats (in planes) whose split-K kernel, for bf16 activations, multiplies bf16 tiles of the integers code times
# sub-block scale and scales the sums by the super-block's d (`qmatmul.qmv_kernel`'s INT_TILES): Q3_K's
# (code - 4) * (scale - 32) is at most 128 in magnitude, Q2_K's code * scale 45, exact in bf16, and one multiply-add
# of bf16 pairs makes each (`float_bits.three_bit_ints`, `two_bit_ints`), where the float decode took a permute an
# element and a multiply-add, and a conversion a pair; Q2_K's mins meet x's sums per sub-block in a second, 16-deep
# dot. Scheduler clocks a weight element, sm_90: Q3_K 5.34 -> 4.14, Q2_K 4.69 -> 3.70; sm_80-89: 6.75 -> 4.72-4.77,
# 6.27 -> 4.21; H100 model at M = 16, issue time over memory time: 1.29 -> 1.00, 1.46 -> 1.15. The weights are the
# reference's float32 ones, not rounded to bf16. fp16 x keeps the float decode: there Q3_K's 12 s is not exact.
# Q2_K's fields 0-2 are decoded where they lie, 1, 4 and 16 times their value, and x's columns come divided by
# those (`float_bits.two_bit_ints`, `split_k_x`); Q3_K's tiles are decoded 32 elements an asm call, its third bits
# as the planes hold them (`kernels.repack.PLANE_ORDERS`). Both are decoded where the tensor cores' operand wants
# them, each thread the words it holds there (`decode_planes.in_operand_order`, x in the same order from
# `split_k_x`), where Triton took them there through shared memory (sm_90, 128 deep: Q3_K 3.69 -> 3.66, Q2_K 2.87
# -> 2.55; sm_80 3.75 -> 3.66, 3.19 -> 2.87).
INT_TILE_FORMATS = frozenset({"Q3_K", "Q2_K"})


def uses_int_tiles(fmt: str, layout: str, dtype_name: str) -> bool:
    """Whether the split-K kernel multiplies integer tiles for a `fmt` weight in `layout` and `dtype_name` x."""
    return layout == "planes" and fmt in INT_TILE_FORMATS and dtype_name == "bf16"


# With bf16 x the f16 weights and the integer tiles multiply another form of x (f16 rows scaled by a power of two;
# columns in the tiles' order, and Q2_K's x sums a sub-block), which each program of the split-K kernel made from
# its x tile, one an n-tile. `qmatmul.split_k_x_kernel` makes it once a call and zeroes y, the launch it replaces
# (sm_90 scheduler clocks a weight element: IQ4_NL 4.12 -> 3.74, IQ4_XS 4.32 -> 3.95, Q3_K 4.14 -> 4.03, Q2_K
# 3.70 -> 3.23, then 2.87 with its fields decoded where they lie and its mins as pairs).
def prepares_split_k_x(fmt: str, layout: str, dtype_name: str) -> bool:
    """Whether the split-K kernel multiplies another form of x than the one given (`qmatmul.split_k_x_kernel`): bf16
    x, for f16 weights or integer tiles."""
    return dtype_name == "bf16" and (uses_half_x(fmt, layout, dtype_name) or uses_int_tiles(fmt, layout, dtype_name))


def split_k_x(x: torch.Tensor, fmt: str, N: int, splits: int, k_per_split: int):
    """bf16 x `(M, K)` -> (the x operand, its shifts, its sums, a zeroed float32 y `(M, N)`) for `splits` splits of
    `k_per_split` columns (`qmatmul.split_k_x_kernel`); unused ones are y."""
    M, K = x.shape
    half = uses_half_x(fmt, "planes", "bf16")
    out = torch.empty((M, N), dtype=torch.float32, device=x.device)
    x_operand = torch.empty((M, K), dtype=torch.float16 if half else x.dtype, device=x.device)
    x_shifts = torch.empty((M, splits), dtype=torch.int32, device=x.device) if half else out
    x_sums = torch.empty((M, K // 8), dtype=torch.bfloat16, device=x.device) if fmt == "Q2_K" else out
    split_k_x_kernel[(M, splits)](x, x_operand, x_shifts, x_sums, out, N, K, k_per_split, triton.cdiv(N, splits),
                                  FMT=FORMAT_IDS[fmt], HALF_X=half, BLOCK=SPLIT_K_X_BLOCK)
    return x_operand, x_shifts, x_sums, out


def split_k_form(cc: int) -> int:
    """The split-K kernel's decode form (`decode_planes.FUSED` or FUSED_BYTES) on compute capability `cc`: 4-bit codes
    a 32-bit word an asm call on Hopper (wgmma), four bytes a register elsewhere, where that counts fewer (sm_80-89,
    mma.sync) or has not been analysed (sm_100 and up: the kernels' form before the word-wise one)."""
    return FUSED if cc == 90 else FUSED_BYTES


def split_k_config(fmt: str, layout: str, dtype_name: str, cc: int) -> dict:
    """The split-K tile for a weight of `fmt` in `layout`, activations `dtype_name`, compute capability `cc`."""
    config = SPLIT_K_CONFIGS[layout][dtype_name]
    if layout == "planes" and cc in SPLIT_K_8_WARPS.get((fmt, dtype_name), ()):
        config = dict(config, num_warps=8)
    if layout == "planes" and (fmt, dtype_name) in SPLIT_K_DEPTHS:
        config = dict(config, BLOCK_K=SPLIT_K_DEPTHS[(fmt, dtype_name)])
    return config


# M = 1, per weight layout: among the tiles tried, the fewest SASS instructions per weight element that compile
# without spills for every format, dtype and sm_80-90 (`python -m bench.compile_check`). Planes: 128 x 128 in 4
# warps, four rows a thread, over which each thread's x loads, sub-block sums and scale decoding spread (sm_90,
# without masks, per element against 64 x 128: Q4_0 3.41 -> 3.06, Q6_K 4.92 -> 4.48, NF4 9.56 -> 7.30; 128 x 256,
# 256 x 128 or 2 warps: 0.1-0.5 fewer for some formats, at 240-255 registers, spilling for Q6_K and NF4). Blocks:
# 32 x 64 in 8 warps (Q4_K 15.3 in 4, where Q8_0 spilled 24 bytes on sm_86 / sm_89).
GEMV_CONFIGS = {"planes": dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=1),
                "blocks": dict(BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=1)}


# Formats (in planes) whose M = 1 kernel sums integer dot products of 16-bit x and byte codes (`int_gemv`): those
# with too few bits an element for the FMA GEMV's float decode to keep up with their bytes (sm_90, scheduler clocks
# a weight element: Q2_K 3.92 -> 1.94, Q3_K 4.31 -> 2.62, IQ4_NL 4.14 -> 2.81, IQ4_XS 4.45 -> 3.12; H100 model,
# issue time over memory time, 1.29 -> 0.64, 1.08 -> 0.66, 0.80 -> 0.54, 0.91 -> 0.63). x is rounded to 2^-15 of
# its group's largest, which adds 2-5e-6 of the output's norm (6-8e-5 next to activations 300x the rest) where the
# float GEMV's is 1-2e-6; one more launch (`quantize_x`), which the static model leaves out.
INT_DOT_FORMATS = frozenset({"Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"})
QUANTIZE_X_BLOCK = 256
SPLIT_K_X_BLOCK = 128


def uses_int_dots(fmt: str, layout: str) -> bool:
    """Whether the M = 1 kernel takes `int_gemv`'s integer dot products for a `fmt` weight in `layout`."""
    return layout == "planes" and fmt in INT_DOT_FORMATS


def transposes_x(fmt: str) -> bool:
    """Whether `fmt`'s integer GEMV reads xq in its 2-bit fields' order (`int_gemv.quantize_x_kernel`)."""
    return fmt in ("Q2_K", "Q3_K")


def quantize_x(x: torch.Tensor, fmt: str, N: int) -> tuple[torch.Tensor, ...]:
    """x `(1, K)` -> (int16 xq, float32 power-of-two scales a group of `X_GROUP`, int32 sums of xq a 16), in the
    order `fmt`'s integer GEMV reads them, and its zeroed float32 y `(1, N)` (`int_gemv.quantize_x_kernel`)."""
    K = x.shape[1]
    out = torch.empty((1, N), dtype=torch.float32, device=x.device)
    xq = torch.empty(K, dtype=torch.int16, device=x.device)
    scales = torch.empty(K // X_GROUP.value, dtype=torch.float32, device=x.device)
    sums = torch.empty(K // 16, dtype=torch.int32, device=x.device)
    quantize_x_kernel[(triton.cdiv(K, QUANTIZE_X_BLOCK),)](x, xq, scales, sums, out, N, K,
                                                          TRANSPOSE_4X4=transposes_x(fmt), BLOCK=QUANTIZE_X_BLOCK)
    return xq, scales, sums, out


def even_tiles(layout: str, N: int, K: int, cfg: dict) -> bool:
    """Whether the split-K kernels' `cfg` tiles lie wholly inside an (N, K) weight in `layout` (`gemv_kernel`'s and
    `qmv_kernel`'s EVEN: their weight loads need no masks). The blocks decoder always masks."""
    return layout == "planes" and N % cfg["BLOCK_N"] == 0 and K % cfg["BLOCK_K"] == 0


# No multiply-add fusion in the dequantize kernel: `q * scale - min` must round twice, as the reference does, for its
# output to be bit-identical (the fused kernels keep fusion: their decoded weight may differ in the last bit there)
DEQUANT_CONFIG = dict(BLOCK_N=32, BLOCK_K=128, num_warps=8, enable_fp_fusion=False)
# The interpreter runs each program's tile operations as numpy calls, so its cost is per tile: BLOCK_K 128 runs
# 3-4x faster than 32 there (measured on Q4_K, 72 x 512). It also leaves a partial K tile for 32- and 64-element
# block formats whose K is not a multiple of 128, which is how the tests reach the K masks (the GPU tiles above meet
# them too: 64- and 128-deep tiles where K is not a multiple of the tile).
INTERPRETER_GEMM = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=128, GROUP_N=4)
INTERPRETER_SPLIT_K = dict(_SPLIT_K_BLOCKS, BLOCK_K=128)
INTERPRETER_GEMV = dict(BLOCK_N=32, BLOCK_K=128)
INTERPRETER_SPLIT_K_FORM = FUSED  # tests/test_triton_kernels.py runs FUSED_BYTES too
# activation dtype -> (its name in the tile tables, the tl.dot operand type)
DTYPES = {torch.float16: ("fp16", tl.float16), torch.bfloat16: ("bf16", tl.bfloat16),
          torch.float32: ("fp32", tl.float32)}
# Triton's interpreter computes tl.dot on bf16 operands wrongly (relative error ~4e11, measured with triton 3.9; fp16
# and fp32 are right), so there bf16 activations are multiplied as fp32: the operands are exact in fp32, only the
# result is rounded to bf16.
INTERPRETER_DOT_DTYPES = {torch.bfloat16: tl.float32}


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return not isinstance(qmv_kernel, triton.runtime.JITFunction)


def gemm_configs(dtype_name: str, layout: str, cc: int) -> tuple:
    """The GEMM tiles the autotuner tries for activations `dtype_name`, a weight in `layout`, compute capability
    `cc` (90 for sm_90)."""
    if cc == 90 and layout == "planes" and dtype_name != "fp32":
        return (WIDE_M_CONFIG, DEEP_K_CONFIG) + HALF_CONFIGS
    return FP32_GEMM_CONFIGS[layout] if dtype_name == "fp32" else HALF_CONFIGS


@functools.cache
def _gemm_autotuned(configs: tuple):
    return triton.autotune([triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, GROUP_N=g), num_warps=w,
                                          num_stages=s) for bn, bm, bk, g, w, s in configs],
                           key=["M", "N", "K", "FMT", "PLANES"])(qmm_kernel)


# (format, activation dtype) whose M = 1 runs on the split-K tensor-core kernel rather than the FMA GEMV: NF4's
# FMA GEMV looks each code's float32 value up in four byte tables (sm_90: 7.30 instructions a weight element), the
# tensor-core kernel, with bf16 activations, each weight's bf16 in two (4.80; with fp16 activations it decodes to
# float32 first, 8.02). H100 model at M = 1, issue time over memory time: 1.40 -> 0.92.
SPLIT_K_AT_M_1 = frozenset({("NF4", "bf16")})


def fused_kernel(M: int, fmt: str, dtype_name: str) -> str:
    """Which fused kernel `quant_linear_triton` runs for M rows of `dtype_name` activations and a `fmt` weight:
    "gemv" (FMA, M = 1), "split-k" (tensor cores, M <= SMALL_M) or "gemm"."""
    if M == 1 and (fmt, dtype_name) not in SPLIT_K_AT_M_1:
        return "gemv"
    return "split-k" if M <= SMALL_M else "gemm"


def _split_k_grid(N: int, K: int, BLOCK_N: int, BLOCK_K: int, device) -> tuple[tuple[int, int], int]:
    """(n tiles, K splits) and the K columns per split: enough programs to keep every SM streaming the weight."""
    k_tiles = triton.cdiv(K, BLOCK_K)
    n_tiles = triton.cdiv(N, BLOCK_N)
    sms = 8 if interpreting() else state.multiprocessor_count(device)
    splits = max(1, min(k_tiles, (4 * sms) // n_tiles))
    k_per_split = triton.cdiv(k_tiles, splits) * BLOCK_K
    return (n_tiles, triton.cdiv(K, k_per_split)), k_per_split


def lookup_table(device) -> torch.Tensor:
    """The kernels' `tables_ptr` on `device`: `float_bits.LOOKUP_WORDS` as 32-bit words (a float32 tensor, NF4's
    values first)."""
    return state.constants("table:kernel lookups", device, lambda d: torch.from_numpy(
        np.array(LOOKUP_WORDS, dtype=np.uint32).view(np.float32)).to(d))


def _require_aligned(weight: QTensor) -> None:
    """The planes decoder reads its f16, f32 and u32 fields as typed loads: the bytes must start at a multiple of 4
    (torch's allocations do; the blocks decoder reads bytes and has no such need)."""
    need = 4 if weight.layout == "planes" else 1
    if weight.raw.data_ptr() % need:
        raise ValueError(f"{weight}: its bytes start at an address that is not a multiple of {need}; pass a copy "
                         "(.contiguous() of a fresh tensor)")


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself where it is contiguous and starts at a multiple of 16 bytes, else a copy that does (the kernels read
    x's rows at stride K, and Triton's JIT compiles its vector loads only for 16-byte aligned pointers)."""
    if x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _dtypes(x: torch.Tensor) -> tuple[str, tl.dtype]:
    """x's dtype name and the dtype its tensor-core kernels multiply in (the interpreter's for bf16: float32)."""
    dtype_name, dot_dtype = DTYPES[x.dtype]
    return dtype_name, INTERPRETER_DOT_DTYPES.get(x.dtype, dot_dtype) if interpreting() else dot_dtype


def quant_linear_triton(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x` `(M, K)` fp16/bf16/fp32 -> `(M, N)` in x's dtype."""
    state.common_device(x, weight.raw, bias)
    _require_aligned(weight)
    x = _aligned_rows(x)
    M, K = x.shape
    N = weight.shape[0]
    fmt = FORMAT_IDS[weight.format]
    planes = weight.layout == "planes"
    dtype_name, dot_dtype = _dtypes(x)
    has_bias = bias is not None
    bias_arg = bias if has_bias else x
    table = lookup_table(x.device)
    with state.on_device(x.device):
        kernel = fused_kernel(M, weight.format, dtype_name)
        if kernel == "gemv":
            cfg = INTERPRETER_GEMV if interpreting() else GEMV_CONFIGS[weight.layout]
            grid, k_per_split = _split_k_grid(N, K, cfg["BLOCK_N"], cfg["BLOCK_K"], x.device)
            int_dots = uses_int_dots(weight.format, weight.layout)
            if int_dots:
                *xs, out = quantize_x(x, weight.format, N)
            else:
                xs, out = (x, x, x), torch.zeros((1, N), dtype=torch.float32, device=x.device)
            gemv_kernel[grid](*xs, weight.raw, bias_arg, out, table, N, K, weight.raw.shape[1], k_per_split,
                              FMT=fmt, PLANES=planes, HAS_BIAS=has_bias, EVEN=even_tiles(weight.layout, N, K, cfg),
                              INT_DOTS=int_dots, **cfg)
            return out.to(x.dtype)
        if kernel == "split-k":
            return split_k_sums(x, weight, bias).to(x.dtype)
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        args = (x, weight.raw, bias_arg, out, table, M, N, K, weight.raw.shape[1], out.stride(0))
        if interpreting():
            c = INTERPRETER_GEMM
            grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
            qmm_kernel[grid](*args, FMT=fmt, PLANES=planes, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype, **c)
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
            configs = gemm_configs(dtype_name, weight.layout, state.compute_capability(x.device))
            _gemm_autotuned(configs)[grid](*args, FMT=fmt, PLANES=planes, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype)
        return out


def split_k_sums(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`quant_linear_triton`'s split-K kernel (1 < M <= 16, and M = 1 for `SPLIT_K_AT_M_1`): its float32 sums
    `(M, N)`, before they are rounded to x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    fmt, layout = weight.format, weight.layout
    dtype_name, dot_dtype = _dtypes(x)
    cfg = INTERPRETER_SPLIT_K if interpreting() else split_k_config(fmt, layout, dtype_name,
                                                                      state.compute_capability(x.device))
    grid, k_per_split = _split_k_grid(N, K, cfg["BLOCK_N"], cfg["BLOCK_K"], x.device)
    form = INTERPRETER_SPLIT_K_FORM if interpreting() else split_k_form(state.compute_capability(x.device))
    half = uses_half_x(fmt, layout, dtype_name)
    prepared = prepares_split_k_x(fmt, layout, dtype_name)
    with state.on_device(x.device):
        if prepared:
            x_operand, x_shifts, x_sums, out = split_k_x(x, fmt, N, grid[1], k_per_split)
        else:
            out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
            x_operand, x_shifts, x_sums = x, out, out
        qmv_kernel[grid](x_operand, x_shifts, x_sums, weight.raw, x if bias is None else bias, out,
                         lookup_table(x.device), M, N, K, weight.raw.shape[1], k_per_split, FMT=FORMAT_IDS[fmt],
                         PLANES=layout == "planes", HAS_BIAS=bias is not None,
                         DOT_DTYPE=tl.float16 if half else dot_dtype, EVEN=even_tiles(layout, N, K, cfg), FORM=form,
                         HALF_WEIGHTS=uses_half_weights(fmt, layout, dtype_name), X_SHIFTS=half and prepared,
                         INT_TILES=uses_int_tiles(fmt, layout, dtype_name),
                         LEVEL_TILES=uses_level_tiles(fmt, layout, dtype_name), **cfg)
    return out


def dequantize_triton(weight: QTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight as a dense `(rows, K)` tensor of `dtype` (written into `out` when given)."""
    rows, K = weight.raw.shape[0], weight.shape[-1]
    _require_aligned(weight)
    if out is None:
        out = torch.empty((rows, K), dtype=dtype, device=weight.device)
    state.common_device(weight.raw, out)
    cfg = DEQUANT_CONFIG
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    with state.on_device(weight.device):
        dequant_kernel[grid](weight.raw, out, lookup_table(weight.device), rows, K, weight.raw.shape[1],
                             FMT=FORMAT_IDS[weight.format], PLANES=weight.layout == "planes", **cfg)
    return out


def dequant_matmul_triton(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Decode the weight into the scratch buffer of (x's device, x's dtype) (`kernels.state`), then torch's
    matmul."""
    state.common_device(x, weight.raw, bias)
    N, K = weight.shape
    dense = dequantize_triton(weight, x.dtype, out=state.scratch(N * K, x.device, x.dtype).view(N, K))
    return torch.nn.functional.linear(x, dense, bias)
