"""ggml's original 32-element block formats (ggml-common.h). Little-endian, no padding:

    Q4_0  18 B: d f16 | qs[16]            x = d * (q - 8)      q: nibbles, low nibbles = elements 0..15, high = 16..31
    Q4_1  20 B: d f16 | m f16 | qs[16]    x = d * q + m
    Q5_0  22 B: d f16 | qh u32 | qs[16]   x = d * (q - 16)     q = nibble | (bit e of qh) << 4
    Q5_1  24 B: d f16 | m f16 | qh u32 | qs[16]   x = d * q + m
    Q8_0  34 B: d f16 | qs int8[32]       x = d * q

Quantizers follow `quantize_row_*_ref` in ggml-quants.c (which `gguf.quants` reproduces byte for byte).
"""

from __future__ import annotations

import numpy as np

from kernels.reference.common import F32, f16_bytes, pack_nibbles, read_f16, unpack_nibbles


def _high_bits(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The 32 fifth bits stored as a little-endian u32 at `offset`, as `(nblocks, 32)` values 0 or 16."""
    return np.unpackbits(blocks[:, offset:offset + 4], axis=-1, bitorder="little") << 4


def _pack_high_bits(codes: np.ndarray) -> np.ndarray:
    return np.packbits(codes >> 4, axis=-1, bitorder="little")


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1/d : 0` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(np.float32)


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The block's min and max as ggml's `if (v < min)` / `if (v > max)` scans find them: the first extreme
    element, which fixes the signs stored for zero extremes in a block mixing +0.0 and -0.0. `(nblocks, 1)` each."""
    return (np.take_along_axis(x, x.argmin(axis=-1)[:, None], axis=-1),
            np.take_along_axis(x, x.argmax(axis=-1)[:, None], axis=-1))


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value with the largest magnitude (first one on ties), `(nblocks, 1)`."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)


def _c_byte_cast(v: np.ndarray) -> np.ndarray:
    """C's `(int8_t)v` / `(uint8_t)v` as compiled for x86 and ARM64 alike: truncate to int32, keep the low byte.

    Only differs from a plain cast when a block's scale is so small (float32 subnormal inputs) that `1/d` is inf:
    the hardware conversion then yields INT32_MIN, whose low byte is 0, and so do ggml and gguf.
    """
    t = np.trunc(v)
    in_range = np.isfinite(t) & (np.abs(t) < 2.0**31)
    return (np.where(in_range, t, -(2.0**31)).astype(np.int64) & 0xFF).astype(np.uint8)


def _codes(scaled: np.ndarray, offset: float, qmax: int) -> np.ndarray:
    """ggml's `MIN(qmax, (int8_t)(v + offset))`."""
    return np.minimum(_c_byte_cast(scaled + F32(offset)).view(np.int8), qmax).view(np.uint8)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = read_f16(blocks, 0)
    q = unpack_nibbles(blocks[:, 2:]).astype(np.float32)
    return (q - F32(8)) * d


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d = _signed_absmax(x) / F32(-8)
    q = _codes(x * _inverse(d), 8.5, 15)
    return np.concatenate([f16_bytes(d), pack_nibbles(q)], axis=-1)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = read_f16(blocks, 0), read_f16(blocks, 2)
    q = unpack_nibbles(blocks[:, 4:]).astype(np.float32)
    return q * d + m


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    lo, hi = _first_min_max(x)
    d = (hi - lo) / F32(15)
    q = _codes((x - lo) * _inverse(d), 0.5, 15)
    return np.concatenate([f16_bytes(d), f16_bytes(lo), pack_nibbles(q)], axis=-1)


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = read_f16(blocks, 0)
    q = (unpack_nibbles(blocks[:, 6:]) | _high_bits(blocks, 2)).astype(np.float32)
    return (q - F32(16)) * d


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d = _signed_absmax(x) / F32(-16)
    q = _codes(x * _inverse(d), 16.5, 31)
    return np.concatenate([f16_bytes(d), _pack_high_bits(q), pack_nibbles(q & 0x0F)], axis=-1)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = read_f16(blocks, 0), read_f16(blocks, 2)
    q = (unpack_nibbles(blocks[:, 8:]) | _high_bits(blocks, 4)).astype(np.float32)
    return q * d + m


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    lo, hi = _first_min_max(x)
    d = (hi - lo) / F32(31)
    # ggml casts to uint8 without a cap: (max - min) * (1/d) + 0.5 never reaches 32.
    q = _c_byte_cast((x - lo) * _inverse(d) + F32(0.5))
    return np.concatenate([f16_bytes(d), f16_bytes(lo), _pack_high_bits(q), pack_nibbles(q & 0x0F)], axis=-1)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = read_f16(blocks, 0)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=-1, keepdims=True) / F32(127)
    scaled = x * _inverse(d)
    q = np.copysign(np.floor(np.abs(scaled) + F32(0.5)), scaled)  # C roundf: halves away from zero
    return np.concatenate([f16_bytes(d), _c_byte_cast(q)], axis=-1)
