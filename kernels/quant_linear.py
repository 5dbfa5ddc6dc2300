"""`quant_linear` / `QuantLinear`: a Linear whose weight stays quantized in memory."""

from __future__ import annotations

import torch
from torch import nn

from kernels import dispatch, state
from kernels.qtensor import QTensor


# What `quant_linear_method` returns:
# "torch": the weight dequantized with the torch codecs, then torch's matmul (CPU tensors outside the interpreter,
#     unquantized formats, FP8 with a per-tensor scale);
# "fused": the Triton dequant-matmul kernels (split-K GEMV for small M, tensor-core GEMM above, see
#     `kernels.triton.ops.fused_kernel`);
# "dequant_matmul": the Triton dequantize kernel into the scratch buffer of `kernels.state`, then torch's matmul,
#     where the GPU's measured dispatch table (`kernels.dispatch`) says that is faster.
METHODS = ("torch", "fused", "dequant_matmul")
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quant_linear_method(x: torch.Tensor, weight: QTensor) -> str:
    """Which of METHODS `quant_linear(x, weight)` runs: CUDA tensors (and CPU tensors when the kernels were imported
    under TRITON_INTERPRET=1) run Triton for every quantized format."""
    from kernels.triton.ops import interpreting

    if not (weight.fmt.is_quantized and weight.scale is None and (x.is_cuda or interpreting())):
        return "torch"
    return dispatch.method_for(weight.format, x.numel() // x.shape[-1], x.device)


def quant_linear(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for any leading dims of `x`, `W` a 2-D QTensor, on the device they share.

    One contract for every method (`quant_linear_method`): `x` is fp16, bf16 or fp32 and the result has its dtype;
    `bias` (N,) may be any float dtype (a file's F32 bias with bf16 activations) and is cast to x's dtype first.
    """
    if len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quant_linear: x {tuple(x.shape)} does not match weight {list(weight.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"quant_linear: activations must be fp16, bf16 or fp32, got {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"quant_linear: bias must be a float ({weight.shape[0]},) tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    state.common_device(x, weight.raw, bias)
    bias = None if bias is None else bias.to(x.dtype)
    method = quant_linear_method(x, weight)
    if method == "torch":
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)
    from kernels.triton.ops import dequant_matmul_triton, quant_linear_triton

    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = (dequant_matmul_triton if method == "dequant_matmul" else quant_linear_triton)(x2d, weight, bias)
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

    @property
    def weight(self) -> QTensor:
        # Built on each access (microseconds) rather than cached: a cached view would keep the bytes a `.to()` moved
        # away alive, and the buffer stays the one place they live.
        return QTensor(self.raw, self.format, (self.out_features, self.in_features), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"
