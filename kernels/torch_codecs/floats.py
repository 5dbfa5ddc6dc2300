"""Unquantized formats, one element per "block": F32, F16, BF16, F8_E4M3 (layouts in `kernels/reference/floats.py`)."""

from __future__ import annotations

import torch

from kernels.torch_codecs.common import as_float, view_bytes_as

# The torch dtype each format's bytes are: asked for that dtype, `dequantize` returns a view of them.
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}


def dequantize_f32(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return as_float(view_bytes_as(blocks, torch.float32), out)


def quantize_f32(x: torch.Tensor) -> torch.Tensor:
    return x.clone().view(torch.uint8)  # a copy, as from every other quantizer: the caller may reuse `x`


# fp16 <-> fp32 in torch rounds as numpy does; only signalling NaNs differ: torch's conversions quiet them (the
# CPU's F16C instructions do), numpy's keep them signalling.

def dequantize_f16(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return as_float(view_bytes_as(blocks, torch.float16), out)


def quantize_f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8)


def dequantize_bf16(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # bf16 -> f32 is the 16-bit shift of the reference on every device, NaN payloads included
    return as_float(view_bytes_as(blocks, torch.bfloat16), out)


def quantize_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even on the dropped 16 bits; NaNs stay NaN (made quiet), as ggml_compute_fp32_to_bf16.

    Not `x.to(torch.bfloat16)`: torch turns every NaN into the one quiet NaN 0x7FC0. In int32 the rounding add cannot
    overflow (only NaN bit patterns come near the top), and the arithmetic shift leaves values that fit an int16.
    """
    bits = x.view(torch.int32)
    high = bits >> 16
    rounded = (high & 1).add_(bits).add_(0x7FFF).bitwise_right_shift_(16)  # in place: one int32 copy fewer
    quiet_nan = high.bitwise_or_(0x40)
    return torch.where(torch.isnan(x), quiet_nan, rounded).to(torch.int16).view(torch.uint8)


# float8 e4m3fn <-> fp32: torch's conversions are the reference's (saturating, round to nearest even, NaN payloads).

def dequantize_f8_e4m3(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return as_float(blocks.view(torch.float8_e4m3fn), out)


def quantize_f8_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).view(torch.uint8)
