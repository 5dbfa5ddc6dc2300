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
    """nn.Linear with a quantized weight (and an optional dense bias).

    The weight's bytes are the registered buffer `raw`, so `.to()`, `state_dict()`, `buffers()` and memory accounting
    see them like any tensor (`.to(dtype)` leaves them alone: torch only casts floating-point buffers); `weight`
    is the `QTensor` view of that buffer."""

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QuantLinear: the weight must be 2-D (out, in), got {weight}")
        self.register_buffer("raw", weight.raw)
        self.format, self.scale = weight.format, weight.scale
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._weight = weight

    @property
    def weight(self) -> QTensor:
        # rebuilt only after the buffer was replaced (.to(), load_state_dict(assign=True)), not on every forward
        if self._weight.raw is not self.raw:
            self._weight = QTensor(self.raw, self.format, (self.out_features, self.in_features), self.scale)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"
