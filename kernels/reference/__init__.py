"""numpy ground truth for every weight format.

`dequantize(raw, fmt)` and `quantize(x, fmt)` follow `gguf.quants`' conventions: the last axis of `raw` holds whole
blocks of bytes, the last axis of `x` whole blocks of elements; leading axes are kept. Each family module states its
block layouts and provides `dequantize_<fmt>(blocks)` (uint8 `(nblocks, block_bytes)` -> float32
`(nblocks, block_size)`) and `quantize_<fmt>(x)` (the reverse), vectorised over blocks.
"""

from __future__ import annotations

import importlib

import numpy as np

from kernels.formats import Format, get_format


def _codec(fmt: Format, verb: str):
    family = importlib.import_module(f"{__name__}.{fmt.family}")
    return getattr(family, f"{verb}_{fmt.name.lower()}")


def dequantize(raw: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 `(..., row_bytes)` in format `fmt` -> float32 `(..., n)`."""
    f = get_format(fmt)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"dequantize {f.name}: raw data must be uint8 bytes, got {raw.dtype}")
    if raw.ndim == 0:
        raise ValueError(f"dequantize {f.name}: raw data must have at least one axis")
    n = f.elements(raw.shape[-1])
    blocks = np.ascontiguousarray(raw).reshape(-1, f.block_bytes)
    with np.errstate(all="ignore"):  # inf/nan scales in a file are data, not an error: they decode as ggml's do
        values = _codec(f, "dequantize")(blocks)
    return values.reshape(*raw.shape[:-1], n)


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """float `(..., n)` -> uint8 `(..., row_bytes)` in format `fmt` (computed in float32)."""
    f = get_format(fmt)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"quantize {f.name}: input must be floating point, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"quantize {f.name}: input must have at least one axis")
    row_bytes = f.row_bytes(x.shape[-1])
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, f.block_size)
    if f.is_quantized and not np.isfinite(blocks).all():
        raise ValueError(f"quantize {f.name}: input contains inf or nan (only plain float formats can store them)")
    with np.errstate(all="ignore"):  # all-zero blocks divide by zero on paths whose result is then discarded
        raw = _codec(f, "quantize")(blocks)
    return raw.reshape(*x.shape[:-1], row_bytes)
