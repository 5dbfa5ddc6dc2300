"""NF4 raw blocks with torch ops only, on any device; bit for bit `kernels/reference/nf4.py`, where the 36-byte block
layout and bitsandbytes' arithmetic are written down. `blocks_from_bnb` turns bitsandbytes' own tensors of a weight
(a Forge checkpoint's) into raw blocks."""

from __future__ import annotations

import torch

from kernels import state
from kernels.formats import NF4_NESTED_BLOCK, NF4_SMALLEST_ABSMAX_DIVISOR, get_format
from kernels.torch_codecs.common import lookup

_FORMAT = get_format("NF4")
BLOCK_SIZE, BLOCK_BYTES = _FORMAT.block_size, _FORMAT.block_bytes
ABSMAX_BYTES = _FORMAT.offset("qs")  # the float32 absmax comes first


def _midpoints(device: torch.device) -> torch.Tensor:
    """Decision boundaries of the nearest-code search, in float32 as bitsandbytes computes them."""
    values = state.table("nf4", device)
    return state.constants("nf4_midpoints", device, lambda d: (values[:-1] + values[1:]) / 2)


def _byte_values(device: torch.device) -> torch.Tensor:
    """`(256,)` int64 whose 8 bytes are the float32 values of a code byte's two elements (high nibble first,
    bitsandbytes' order): looked up as one 8-byte word, which `index_select` copies far faster than a row of two."""
    values = state.table("nf4", device)
    return state.constants("nf4_byte_values", device, lambda d: torch.stack(
        [values.repeat_interleave(16), values.repeat(16)], dim=-1).view(torch.int64).reshape(256))


def _require(t, name: str, dtype: torch.dtype, row: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.ndim != 2 or t.shape[1] != row:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"NF4: {name} must be a {dtype} tensor of shape (nblocks, {row}), got {got}")


def dequantize_nf4(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 `(nblocks, 36)` raw NF4 blocks -> float32 `(nblocks, 64)` on the same device, written into `out` when
    given (as `torch_codecs.dequantize` passes it)."""
    _require(blocks, "blocks", torch.uint8, BLOCK_BYTES)
    # (nblocks, 1): view() reinterprets in native byte order, little-endian on every CPU and GPU torch supports.
    absmax = blocks[:, :ABSMAX_BYTES].contiguous().view(torch.float32)
    # one lookup per byte gives both of its elements, already in element order
    words = None if out is None else out.view(torch.int64)
    pairs = lookup(_byte_values(blocks.device), blocks[:, ABSMAX_BYTES:], words)
    return pairs.view(torch.float32).view(blocks.shape[0], BLOCK_SIZE).mul_(absmax)


def quantize_nf4(x: torch.Tensor) -> torch.Tensor:
    """float32 `(nblocks, 64)` -> uint8 `(nblocks, 36)` raw NF4 blocks on the same device."""
    _require(x, "x", torch.float32, BLOCK_SIZE)
    absmax = x.abs().amax(dim=1)
    # the divisor is a Python float; clamp rounds it to the same float32 as the reference's
    scaled = (x * (1.0 / absmax.clamp(min=NF4_SMALLEST_ABSMAX_DIVISOR))[:, None]).clamp(-1.0, 1.0)
    # bucketize (right=False) counts the midpoints strictly below each value: a tie takes the lower code, NaN code 15.
    codes = torch.bucketize(scaled, _midpoints(x.device)).to(torch.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    absmax_bytes = absmax.contiguous().view(torch.uint8).reshape(-1, ABSMAX_BYTES)
    return torch.cat((absmax_bytes, packed), dim=1)


def _flat(t, name: str, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"NF4: {name} must be a {dtype} tensor, got {got}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"NF4: {name} must have shape ({numel},), got {tuple(t.shape)}")
    return t.reshape(-1)


def blocks_from_bnb(codes: torch.Tensor, absmax: torch.Tensor | None = None, *,
                    quantized_absmax: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
                    nested_quant_map: torch.Tensor | None = None, offset: float | None = None) -> torch.Tensor:
    """bitsandbytes' NF4 tensors of one flattened weight -> uint8 `(nblocks, 36)` raw NF4 blocks, on codes' device.

    `codes`: uint8, the packed codes (numel / 2 bytes); then either `absmax` (float32, one per 64 weights) or the
    double-quantized statistics: `quantized_absmax` (uint8 indices into `nested_quant_map`, float32 (256,)),
    `nested_absmax` (float32, one per 256 blocks) and `offset`. The absmax is the one bitsandbytes dequantizes
    (`map[q] * nested_absmax + offset`, each step rounded to float32), bit for bit `reference.nf4.absmax_of`;
    the code bytes are copied as they are. ValueError on inconsistent tensors."""
    codes = _flat(codes, "codes", torch.uint8)
    if codes.numel() == 0 or codes.numel() % (BLOCK_SIZE // 2):
        raise ValueError(f"NF4: codes must hold a positive whole number of {BLOCK_SIZE // 2}-byte blocks, got "
                         f"{codes.numel()} bytes")
    nblocks = codes.numel() // (BLOCK_SIZE // 2)
    nested = (quantized_absmax, nested_absmax, nested_quant_map, offset)
    if absmax is not None:
        if any(part is not None for part in nested):
            raise ValueError("NF4: give either absmax or the double-quantized statistics, not both")
        absmax = _flat(absmax, "absmax", torch.float32, nblocks)
    else:
        if any(part is None for part in nested):
            raise ValueError("NF4: without absmax, quantized_absmax, nested_absmax, nested_quant_map and offset are "
                             "all required")
        indices = _flat(quantized_absmax, "quantized_absmax", torch.uint8, nblocks)
        scales = _flat(nested_absmax, "nested_absmax", torch.float32, -(nblocks // -NF4_NESTED_BLOCK))
        code_map = _flat(nested_quant_map, "nested_quant_map", torch.float32, 256)
        scales = scales.repeat_interleave(NF4_NESTED_BLOCK)[:nblocks]
        offset = torch.tensor(offset, dtype=torch.float32, device=codes.device)
        absmax = code_map[indices.long()] * scales + offset  # two float32 roundings, as bitsandbytes
    absmax_bytes = absmax.to(codes.device).contiguous().view(torch.uint8).reshape(nblocks, ABSMAX_BYTES)
    return torch.cat((absmax_bytes, codes.reshape(nblocks, BLOCK_SIZE // 2)), dim=1)
