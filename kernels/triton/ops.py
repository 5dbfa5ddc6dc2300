"""Launchers for the Triton kernels: tile configurations, the small-M / large-M choice, dtypes."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.qtensor import QTensor
from kernels.reference.nf4 import NF4_VALUES
from kernels.triton.decode import FORMAT_IDS
from kernels.triton.qmatmul import dequant_kernel, qmm_kernel, qmv_kernel

SMALL_M = 16  # up to here the weight-streaming split-K kernel runs

# GEMM tiles per activation dtype, (BLOCK_N, BLOCK_M, BLOCK_K, GROUP_N, num_warps, num_stages): the ones that compile
# without register spills for every format on sm_80/86/89/90 (the per-element decode is register hungry, fp32 tiles
# twice so). tests/test_triton_compile.py checks a subset in CI, `python -m bench.compile_check` all of them.
HALF_CONFIGS = (
    (128, 128, 16, 8, 8, 3),
    (64, 128, 32, 8, 8, 3),
    (64, 64, 16, 8, 4, 4),
)
GEMM_CONFIGS = {"fp16": HALF_CONFIGS, "bf16": HALF_CONFIGS, "fp32": ((64, 64, 16, 8, 4, 4),)}
GEMV_CONFIG = dict(BLOCK_N=128, BLOCK_M=SMALL_M, BLOCK_K=32, num_warps=8, num_stages=3)
DEQUANT_CONFIG = dict(BLOCK_N=32, BLOCK_K=128, num_warps=8)
# The interpreter runs every program in Python: the smallest tiles keep tests fast.
INTERPRETER_GEMM = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, GROUP_N=4)
# activation dtype -> (its name in GEMM_CONFIGS, the tl.dot operand type)
DTYPES = {torch.float16: ("fp16", tl.float16), torch.bfloat16: ("bf16", tl.bfloat16),
          torch.float32: ("fp32", tl.float32)}


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return not isinstance(qmv_kernel, triton.runtime.JITFunction)


_NF4_TABLES: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device) -> torch.Tensor:
    if device not in _NF4_TABLES:
        _NF4_TABLES[device] = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return _NF4_TABLES[device]


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gemm_autotuned(configs):
    return triton.autotune([triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, GROUP_N=g), num_warps=w,
                                          num_stages=s) for bn, bm, bk, g, w, s in configs],
                           key=["M", "N", "K", "FMT"])(qmm_kernel)


_QMM_AUTOTUNED = {name: _gemm_autotuned(configs) for name, configs in GEMM_CONFIGS.items()}


def quant_linear_triton(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x` `(M, K)` contiguous fp16/bf16/fp32 -> `(M, N)` in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    fmt = FORMAT_IDS[weight.format]
    dtype_name, dot_dtype = DTYPES[x.dtype]
    has_bias = bias is not None
    bias_arg = bias if has_bias else x
    table = _nf4_table(x.device)
    if M <= SMALL_M:
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        cfg = GEMV_CONFIG
        k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
        n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
        sms = 8 if interpreting() else _multiprocessors(x.device)
        splits = max(1, min(k_tiles, (4 * sms) // n_tiles))  # enough programs to keep every SM streaming
        k_per_split = triton.cdiv(k_tiles, splits) * cfg["BLOCK_K"]
        grid = (n_tiles, triton.cdiv(K, k_per_split))
        qmv_kernel[grid](x, weight.raw, bias_arg, out, table, M, N, K, weight.raw.shape[1], x.stride(0), k_per_split,
                         FMT=fmt, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype, **cfg)
        return out.to(x.dtype)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    args = (x, weight.raw, bias_arg, out, table, M, N, K, weight.raw.shape[1], x.stride(0), out.stride(0))
    if interpreting():
        c = INTERPRETER_GEMM
        grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
        qmm_kernel[grid](*args, FMT=fmt, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype, **c)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _QMM_AUTOTUNED[dtype_name][grid](*args, FMT=fmt, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype)
    return out


def dequantize_triton(weight: QTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight as a dense `(rows, K)` tensor of `dtype` (written into `out` when given)."""
    rows, K = weight.raw.shape[0], weight.shape[-1]
    if out is None:
        out = torch.empty((rows, K), dtype=dtype, device=weight.device)
    cfg = DEQUANT_CONFIG
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    dequant_kernel[grid](weight.raw, out, _nf4_table(weight.device), rows, K, weight.raw.shape[1],
                         FMT=FORMAT_IDS[weight.format], **cfg)
    return out


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_matmul_triton(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Decode the weight into one reusable scratch buffer per (device, dtype), then torch's matmul."""
    N, K = weight.shape
    key = (x.device, x.dtype)
    if key not in _SCRATCH or _SCRATCH[key].numel() < N * K:
        _SCRATCH[key] = torch.empty(N * K, dtype=x.dtype, device=x.device)
    dense = dequantize_triton(weight, x.dtype, out=_SCRATCH[key][:N * K].view(N, K))
    return torch.nn.functional.linear(x, dense, bias)
