"""`QTensor`: a weight kept in its stored (quantized) format, in CPU or GPU memory, until a kernel decodes it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import repack, torch_codecs
from kernels.formats import Format, get_format


@dataclass(frozen=True)
class QTensor:
    """Raw blocks `raw` (uint8 `(rows, row_bytes)`, rows = prod(shape[:-1])) of a tensor of logical `shape` in
    format `format`; blocks run along the last logical dimension (a Linear's input dimension K).

    `scale`, when given, multiplies every decoded value (the per-tensor scale of "scaled FP8" checkpoints).
    `layout` is "blocks" (the stored bytes) or "planes" (the same bytes regrouped for the GPU kernels,
    `kernels.repack`).
    """

    raw: torch.Tensor
    format: str
    shape: tuple[int, ...]
    scale: float | None = None
    layout: str = "blocks"

    def __post_init__(self):
        fmt = get_format(self.format)
        object.__setattr__(self, "format", fmt.name)  # the canonical spelling: kernels look formats up by it
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.raw.dtype != torch.uint8 or self.raw.dim() != 2:
            raise ValueError(f"QTensor {self.format}: raw must be 2-D uint8, got {self.raw.dtype} {tuple(self.raw.shape)}")
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"QTensor {self.format}: bad logical shape {self.shape}")
        if self.layout not in repack.LAYOUTS:
            raise ValueError(f"QTensor {self.format}: layout must be one of {', '.join(repack.LAYOUTS)}, got "
                             f"{self.layout!r}")
        K = self.shape[-1]
        row_bytes = repack.planes_row_bytes(fmt, K) if self.layout == "planes" else fmt.row_bytes(K)
        expected = (math.prod(self.shape[:-1]), row_bytes)
        if tuple(self.raw.shape) != expected:
            raise ValueError(f"QTensor {self.format}{list(self.shape)} ({self.layout}): raw has shape "
                             f"{tuple(self.raw.shape)}, expected {expected}")

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def kernel_nbytes(self) -> int:
        """Bytes in the layout the GPU kernels read, which a CUDA device holds (planes where the format has them)."""
        if self.layout == "planes" or not repack.has_planes(self.fmt):
            return self.nbytes
        return self.raw.shape[0] * repack.planes_row_bytes(self.fmt, self.shape[-1])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = torch_codecs.dequantize(self.blocks().raw, self.format,
                                         torch.float32 if self.scale is not None else dtype)
        if self.scale is not None:
            values = values.mul_(self.scale).to(dtype)
        return values.reshape(self.shape)

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(self.raw.to(device), self.format, self.shape, self.scale, self.layout)

    def planes(self) -> QTensor:
        """This weight in the planes layout, repacked on its device (itself when already there or when its format
        has none)."""
        if self.layout == "planes" or not repack.has_planes(self.fmt):
            return self
        return QTensor(repack.to_planes(self.raw, self.fmt), self.format, self.shape, self.scale, "planes")

    def blocks(self) -> QTensor:
        """This weight in the stored layout (itself when already there)."""
        if self.layout == "blocks":
            return self
        return QTensor(repack.to_blocks(self.raw, self.fmt, self.shape[-1]), self.format, self.shape, self.scale)

    @classmethod
    def quantize(cls, weight: torch.Tensor, format: str) -> QTensor:
        """Quantize a dense tensor (blocks along its last dimension) with the torch codecs."""
        raw = torch_codecs.quantize(weight.reshape(-1, weight.shape[-1]), format)
        return cls(raw, format, tuple(weight.shape))

    def __repr__(self) -> str:
        scale = f", scale={self.scale}" if self.scale is not None else ""
        layout = ", layout=planes" if self.layout == "planes" else ""
        return f"QTensor({self.format}, shape={list(self.shape)}, device={self.device}{scale}{layout})"
