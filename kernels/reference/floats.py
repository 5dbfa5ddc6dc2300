"""Unquantized formats, one element per "block": F32 (4 bytes), F16 (IEEE half, 2 bytes), BF16 (top half of an
F32, 2 bytes), all little-endian."""

from __future__ import annotations

import numpy as np


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32)


def quantize_f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).view(np.uint8)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def quantize_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even on the dropped 16 bits; NaNs stay NaN (made quiet), as ggml_compute_fp32_to_bf16."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)
