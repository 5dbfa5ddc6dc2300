"""Pieces shared by the numpy reference codecs: fp16 fields, nibble packing and ggml's float32 arithmetic quirks."""

from __future__ import annotations

import numpy as np

F32 = np.float32


def read_f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian fp16 at byte `offset` of every block, as float32 `(nblocks, 1)`."""
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 `(nblocks,)` or `(nblocks, 1)` -> its fp16 (round to nearest even, as GGML_FP32_TO_FP16) as 2 bytes."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def f16_round(values: np.ndarray) -> np.ndarray:
    """float32 -> fp16 -> float32, the value a stored scale has when it is read back."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: adds 1.5 * 2**23 in float32 and reads the mantissa bits.

    Rounds half to even for |v| < 2**22; beyond that (a huge ratio after a tiny scale) it wraps exactly as ggml does
    before ggml clamps, so the clamped codes agree with ggml's too.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = (np.asarray(values, dtype=np.float32) + F32(12582912.0)).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def sequential_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 one term after the other in float32, like ggml's `for (i...) sum += term[i]`.

    Written out because numpy's `sum` picks its order by layout (pairwise along a contiguous axis, and for short
    rows even down axis 0), which rounds differently and would change which candidate scale the searches pick.
    """
    terms = np.asarray(terms, dtype=np.float32)
    total = terms[0].copy()
    for term in terms[1:]:
        total += term
    return total


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `x` `(n, B)`: (largest |x|, the signed value where it first occurs), ggml's `if (ax > amax)` scan."""
    where = np.abs(x).argmax(axis=0)
    signed = np.take_along_axis(x, where[None, :], axis=0)[0]
    return np.abs(signed), signed


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 `(..., m)` -> `(..., 2m)`: the low nibbles of all bytes, then the high nibbles (ggml's order)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Inverse of `unpack_nibbles`: `(..., 2m)` codes < 16 -> uint8 `(..., m)`."""
    codes = codes.astype(np.uint8)
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 `(..., m)` holding `8 // bits` fields per byte -> `(..., 8 // bits, m)`: field k of every byte in row k."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]
    return (packed[..., None, :] >> shifts) & np.uint8((1 << bits) - 1)


def pack_bits(fields: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `unpack_bits`: `(..., 8 // bits, m)` -> uint8 `(..., m)`."""
    fields = fields.astype(np.uint8)
    out = np.zeros(fields.shape[:-2] + fields.shape[-1:], dtype=np.uint8)
    for k in range(fields.shape[-2]):
        out |= fields[..., k, :] << np.uint8(k * bits)
    return out
