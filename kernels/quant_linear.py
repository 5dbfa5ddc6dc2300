"""`quant_linear` / `QuantLinear`: a Linear whose weight stays quantized in memory."""

from __future__ import annotations

import torch
from torch import nn

from kernels.qtensor import QTensor


def _use_triton(x: torch.Tensor, weight: QTensor) -> bool:
    from kernels.triton.ops import interpreting

    return weight.fmt.is_quantized and weight.scale is None and (x.is_cuda or interpreting())


def quant_linear(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for any leading dims of `x` (fp16, bf16 or fp32), `W` a 2-D QTensor.

    CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run Triton: the fused kernels, or dequantize-into-scratch
    + torch matmul where the GPU's measured dispatch table says that is faster (`kernels.dispatch`); otherwise the
    weight is dequantized with the torch codecs and multiplied with torch.
    """
    if len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quant_linear: x {tuple(x.shape)} does not match weight {list(weight.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"quant_linear: activations must be fp16, bf16 or fp32, got {x.dtype}")
    if not _use_triton(x, weight):
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)
    from kernels.dispatch import method_for
    from kernels.triton.ops import dequant_matmul_triton, quant_linear_triton

    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    if method_for(weight.format, x2d.shape[0], x.device) == "dequant_matmul":
        y = dequant_matmul_triton(x2d, weight, bias)
    else:
        y = quant_linear_triton(x2d, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class QuantLinear(nn.Module):
    """nn.Linear with a `QTensor` weight (and an optional dense bias)."""

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # move the QTensor along with the module (.to(device), .cuda()); dtype changes leave its bytes alone
        super()._apply(fn, recurse)
        moved = fn(torch.empty(0, device=self.weight.device))
        if moved.device != self.weight.device:
            self.weight = self.weight.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.weight.format}"
