"""torch codecs for every weight format: the fallback used where Triton is not (CPU, or CUDA without Triton).

Same conventions as the numpy ground truth in `kernels.reference`, whose results these match bit for bit:
`dequantize(raw, fmt)` and `quantize(x, fmt)` work on the last axis (whole blocks of bytes / of elements) and keep
leading axes; each family module `kernels.torch_codecs.<family>` provides `dequantize_<fmt>(blocks, out)` (uint8
`(nblocks, block_bytes)` -> float32 `(nblocks, block_size)`, written into `out` and returned) and `quantize_<fmt>(x)`
(the reverse), vectorised over blocks with torch operations only, so everything runs on the input's device.

On the CPU `dequantize` decodes a large weight in steps of a few hundred thousand elements into one output on huge
pages (`huge_pages`): each step's temporaries then stay in cache and are reused by the allocator, where decoding the
whole weight at once would map fresh pages for every full-size temporary - that, not the arithmetic, was most of
the time (`python -m bench.codecs` compares with ComfyUI-GGUF's decoder).
"""

from __future__ import annotations

import importlib

import torch

from kernels.formats import Format, get_format
from kernels.torch_codecs import huge_pages
from kernels.torch_codecs.common import view_bytes_as
from kernels.torch_codecs.floats import STORED_DTYPES


# The K-quant searches make a dozen passes per candidate scale over their working set: on the CPU it must stay in
# cache (measured best around 2**18 elements on 2 cores); on a GPU larger chunks only amortise launches.
_QUANTIZE_CHUNK_ELEMENTS = {"cpu": 1 << 18}
# Decoding makes a few passes over each step's codes and values: 2**19 elements (2 MB of float32) amortises the
# per-operation overhead of the ~20 operations a step takes and keeps their temporaries cached (measured on 2 cores:
# 2**16 was 1.5-2x slower, 2**20 no faster).
_DEQUANTIZE_CHUNK_ELEMENTS = {"cpu": 1 << 19}


def _codec(fmt: Format, verb: str):
    family = importlib.import_module(f"{__name__}.{fmt.family}")
    return getattr(family, f"{verb}_{fmt.name.lower()}")


def _all_finite(x: torch.Tensor) -> bool:
    """Whether `x` holds no inf or NaN, read off its min and max (which propagate NaN): one reduction, much faster
    than `isfinite(x).all()`."""
    return x.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def dequantize(raw: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 `(..., row_bytes)` in format `fmt` -> `(..., n)` in `dtype` (computed in float32, then cast). A plain
    float format asked for its own dtype gives a view of the bytes where they are aligned, as the reference does."""
    f = get_format(fmt)
    raw = torch.as_tensor(raw)
    if raw.dtype != torch.uint8:
        raise ValueError(f"dequantize {f.name}: raw data must be uint8 bytes, got {raw.dtype}")
    if raw.ndim == 0:
        raise ValueError(f"dequantize {f.name}: raw data must have at least one axis")
    if not dtype.is_floating_point:
        raise ValueError(f"dequantize {f.name}: output dtype must be floating point, got {dtype}")
    shape = (*raw.shape[:-1], f.elements(raw.shape[-1]))
    blocks = raw.contiguous().reshape(-1, f.block_bytes)
    if STORED_DTYPES.get(f.name) == dtype:
        return view_bytes_as(blocks, dtype).reshape(shape)
    codec = _codec(f, "dequantize")
    nblocks = blocks.shape[0]
    step = max(1, _DEQUANTIZE_CHUNK_ELEMENTS.get(raw.device.type, 1 << 62) // f.block_size)
    values = huge_pages.empty((nblocks, f.block_size), dtype, raw.device)
    if dtype != torch.float32:  # decoded in float32 a step at a time, then rounded once
        work = torch.empty((min(step, nblocks), f.block_size), device=raw.device)
    for start in range(0, nblocks, step):
        chunk, target = blocks[start:start + step], values[start:start + step]
        if dtype == torch.float32:
            codec(chunk, target)
        else:
            target.copy_(codec(chunk, work[:chunk.shape[0]]))
    return values.reshape(shape)


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """float `(..., n)` -> uint8 `(..., row_bytes)` in format `fmt` (computed in float32)."""
    f = get_format(fmt)
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"quantize {f.name}: input must be floating point, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"quantize {f.name}: input must have at least one axis")
    row_bytes = f.row_bytes(x.shape[-1])
    blocks = x.to(torch.float32).contiguous().reshape(-1, f.block_size)
    if f.is_quantized and not _all_finite(blocks):
        raise ValueError(f"quantize {f.name}: input contains inf or nan (only plain float formats can store them)")
    codec = _codec(f, "quantize")
    raw = torch.empty((blocks.shape[0], f.block_bytes), dtype=torch.uint8, device=blocks.device)
    chunk = max(1, _QUANTIZE_CHUNK_ELEMENTS.get(blocks.device.type, 1 << 24) // f.block_size)
    for start in range(0, blocks.shape[0], chunk):
        raw[start:start + chunk] = codec(blocks[start:start + chunk])
    return raw.reshape(*x.shape[:-1], row_bytes)
