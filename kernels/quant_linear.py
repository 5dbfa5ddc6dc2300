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
    The product runs as the custom operator `torch.ops.flux_quant.linear`, which torch.compile keeps in its graph.
    """
    if len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quant_linear: x {tuple(x.shape)} does not match weight {list(weight.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"quant_linear: activations must be fp16, bf16 or fp32, got {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"quant_linear: bias must be a float ({weight.shape[0]},) tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    state.common_device(x, weight.raw, bias)
    return linear(x, weight.raw, weight.format, weight.scale, weight.layout,
                  None if bias is None else bias.to(x.dtype))


# The operator behind `quant_linear`: the weight as its bytes and format (a QTensor is no tensor to torch), the bias
# already in x's dtype. torch.compile traces through the call without looking inside (Triton launches, dispatch
# tables, the torch codecs), knowing the result's shape and dtype from `_linear_shape`.
@torch.library.custom_op("flux_quant::linear", mutates_args=())
def linear(x: torch.Tensor, raw: torch.Tensor, fmt: str, scale: float | None, layout: str,
           bias: torch.Tensor | None) -> torch.Tensor:
    weight = _weight(raw, fmt, scale, layout, x.shape[-1])
    method = quant_linear_method(x, weight)
    if method == "torch":
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)
    from kernels.triton.ops import dequant_matmul_triton, quant_linear_triton

    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = (dequant_matmul_triton if method == "dequant_matmul" else quant_linear_triton)(x2d, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@linear.register_fake
def _linear_shape(x, raw, fmt, scale, layout, bias):
    return x.new_empty((*x.shape[:-1], raw.shape[0]))


def _save_for_backward(ctx, inputs, output):
    x, raw, fmt, scale, layout, bias = inputs
    ctx.save_for_backward(raw)
    ctx.fmt, ctx.scale, ctx.layout, ctx.K, ctx.has_bias = fmt, scale, layout, x.shape[-1], bias is not None


def _linear_backward(ctx, grad):
    """Gradients for x and the bias (the weight is frozen bytes): `grad @ W` and `grad` summed over the rows."""
    (raw,) = ctx.saved_tensors
    grad_x = grad @ dequantized(raw, ctx.fmt, ctx.scale, ctx.layout, ctx.K, grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_bias


linear.register_autograd(_linear_backward, setup_context=_save_for_backward)


# The weight decoded for the backward pass, as an operator of its own: traced, the torch codecs' cached tables would
# meet fake tensors.
@torch.library.custom_op("flux_quant::dequantize", mutates_args=())
def dequantized(raw: torch.Tensor, fmt: str, scale: float | None, layout: str, K: int, dtype: torch.dtype
                ) -> torch.Tensor:
    return _weight(raw, fmt, scale, layout, K).dequantize(dtype)


@dequantized.register_fake
def _dequantized_shape(raw, fmt, scale, layout, K, dtype):
    return raw.new_empty((raw.shape[0], K), dtype=dtype)


def _weight(raw: torch.Tensor, fmt: str, scale: float | None, layout: str, K: int) -> QTensor:
    """The 2-D QTensor of K columns the operators' arguments describe."""
    return QTensor(raw, fmt, (raw.shape[0], K), scale, layout)


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
        self.format, self.scale, self.layout = weight.format, weight.scale, weight.layout
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> QTensor:
        # Built on each access (microseconds) rather than cached: a cached view would keep the bytes a `.to()` moved
        # away alive, and the buffer stays the one place they live.
        return QTensor(self.raw, self.format, (self.out_features, self.in_features), self.scale, self.layout)

    def to_planes_(self) -> QuantLinear:
        """Repack the weight into the planes layout the GPU kernels read fastest (`kernels.repack`), where its bytes
        are; a no-op for formats without one. The stored bytes are let go (a memory-mapped file stays untouched)."""
        planes = self.weight.planes()
        self.raw, self.layout = planes.raw, planes.layout
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        layout = ", layout=planes" if self.layout == "planes" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{layout}"
