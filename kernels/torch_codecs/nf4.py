"""NF4 raw blocks with torch ops only, on any device; bit for bit `kernels/reference/nf4.py`, where the 36-byte block
layout and bitsandbytes' arithmetic are written down."""

from __future__ import annotations

import torch

from kernels import state
from kernels.reference.nf4 import ABSMAX_BYTES, BLOCK_BYTES, BLOCK_SIZE, SMALLEST_ABSMAX_DIVISOR

_SMALLEST_ABSMAX_DIVISOR = float(SMALLEST_ABSMAX_DIVISOR)  # clamp() rounds it back to the same float32


def _midpoints(device: torch.device) -> torch.Tensor:
    """Decision boundaries of the nearest-code search, in float32 as bitsandbytes computes them."""
    values = state.table("nf4", device)
    return state.constants("nf4_midpoints", device, lambda d: (values[:-1] + values[1:]) / 2)


def _require(t, name: str, dtype: torch.dtype, row: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.ndim != 2 or t.shape[1] != row:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"NF4: {name} must be a {dtype} tensor of shape (nblocks, {row}), got {got}")


def dequantize_nf4(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 `(nblocks, 36)` raw NF4 blocks -> float32 `(nblocks, 64)` on the same device."""
    _require(blocks, "blocks", torch.uint8, BLOCK_BYTES)
    # (nblocks, 1): view() reinterprets in native byte order, little-endian on every CPU and GPU torch supports.
    absmax = blocks[:, :ABSMAX_BYTES].contiguous().view(torch.float32)
    packed = blocks[:, ABSMAX_BYTES:]
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(blocks.shape[0], BLOCK_SIZE)
    return state.table("nf4", blocks.device)[codes.long()] * absmax


def quantize_nf4(x: torch.Tensor) -> torch.Tensor:
    """float32 `(nblocks, 64)` -> uint8 `(nblocks, 36)` raw NF4 blocks on the same device."""
    _require(x, "x", torch.float32, BLOCK_SIZE)
    absmax = x.abs().amax(dim=1)
    scaled = (x * (1.0 / absmax.clamp(min=_SMALLEST_ABSMAX_DIVISOR))[:, None]).clamp(-1.0, 1.0)
    # bucketize (right=False) counts the midpoints strictly below each value: a tie takes the lower code, NaN code 15.
    codes = torch.bucketize(scaled, _midpoints(x.device)).to(torch.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    absmax_bytes = absmax.contiguous().view(torch.uint8).reshape(-1, ABSMAX_BYTES)
    return torch.cat((absmax_bytes, packed), dim=1)
