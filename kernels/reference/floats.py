"""Unquantized formats, one element per "block": F32 (4 bytes), F16 (IEEE half, 2 bytes), BF16 (top half of an
F32, 2 bytes), all little-endian, and F8_E4M3 (1 byte).

F8_E4M3 is float8 e4m3fn (OCP FP8, torch.float8_e4m3fn): sign bit, 4 exponent bits with bias 7, 3 mantissa bits.
    exponent 0:        (-1)^s * m / 8 * 2^-6          (subnormals, the smallest 2^-9)
    exponent 1 .. 15:  (-1)^s * (1 + m / 8) * 2^(e - 7)
except that 0x7F and 0xFF (exponent 15, mantissa 7) are NaN: there are no infinities, the largest value is 448
(0x7E). Decoded NaNs get the payload a widening conversion gives them (mantissa bits on top: 0x7FF00000, with the
sign), as torch's `.float()` does. Encoding is torch's `.to(torch.float8_e4m3fn)` (c10::Float8_e4m3fn): round to
nearest, ties to even; everything beyond the range, infinities included, saturates to +-448; NaN stays NaN with its
sign (0x7F / 0xFF); the sign of zero and of values rounding to zero is kept.
"""

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


def _e4m3fn_values() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn bytes (NaN payload 0x7FF00000 with the byte's sign)."""
    b = np.arange(256, dtype=np.uint32)
    exponent, mantissa = (b >> 3) & 0xF, b & 7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent.astype(np.int64) - 7))
    values = np.where(b & 0x80, -magnitude, magnitude).astype(np.float32)
    is_nan = (b & 0x7F) == 0x7F
    nan_bits = ((b & 0x80) << 24) | 0x7FF00000
    return np.where(is_nan, nan_bits, values.view(np.uint32)).astype(np.uint32).view(np.float32)


E4M3FN_VALUES = _e4m3fn_values()
E4M3FN_MAX_CODE = 0x7E  # 448
# Rounding boundaries between consecutive non-negative values (exact in float32: at most 5 significant bits).
_E4M3FN_MIDPOINTS = (E4M3FN_VALUES[:E4M3FN_MAX_CODE] + E4M3FN_VALUES[1:E4M3FN_MAX_CODE + 1]) / np.float32(2)


def dequantize_f8_e4m3(blocks: np.ndarray) -> np.ndarray:
    return E4M3FN_VALUES[blocks]


def quantize_f8_e4m3(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, saturating to +-448 (infinities too), NaN to 0x7F with x's sign bit."""
    x = x.astype(np.float32)
    magnitude = np.abs(x)
    # number of boundaries strictly below |x|: a value on a boundary gets the lower code, moved up when that is odd
    code = np.searchsorted(_E4M3FN_MIDPOINTS, magnitude, side="left")
    tie = magnitude == _E4M3FN_MIDPOINTS[np.minimum(code, E4M3FN_MAX_CODE - 1)]
    code = code + (tie & (code % 2 == 1))
    code = np.where(np.isnan(x), 0x7F, code).astype(np.uint8)
    sign = (x.view(np.uint32) >> 24).astype(np.uint8) & np.uint8(0x80)
    return code | sign
