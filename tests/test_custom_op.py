"""`quant_linear` as the registered custom operator `torch.ops.flux_quant.linear`: torch.library's own checks, and
torch.compile tracing a whole (tiny) Flux with quantized Linears as one graph.

Without a GPU tests/conftest.py sets TRITON_INTERPRET=1: the quantized formats then run the Triton kernels in the
interpreter on CPU tensors (shapes stay tiny); F16 runs the torch path."""

import sys
from pathlib import Path

import pytest
import torch

from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear, dequantized, linear, quant_linear

sys.path.insert(0, str(Path(__file__).parent))
from flux_fixtures import is_block_weight, tiny_flux  # noqa: E402


def weight(fmt: str, n: int, k: int, seed: int = 0) -> QTensor:
    generator = torch.Generator().manual_seed(seed)
    return QTensor.quantize(torch.randn((n, k), generator=generator) * 0.1, fmt)


# M = 1 with Q2_K in planes: the integer-dot GEMV, which rounds x in a kernel of its own first
@pytest.mark.parametrize("fmt, with_bias, layout, m", [("Q4_0", True, "blocks", 3), ("Q4_0", False, "planes", 3),
                                                        ("IQ4_NL", False, "blocks", 3), ("NF4", True, "planes", 3),
                                                        ("Q4_K", True, "planes", 3), ("F16", True, "blocks", 3),
                                                        ("Q2_K", True, "planes", 1)])
def test_opcheck(fmt, with_bias, layout, m):
    k = 256 if fmt in ("Q4_K", "Q2_K") else 64  # K-quants: whole 256-element super-blocks
    w = weight(fmt, 24, k)
    w = w.planes() if layout == "planes" else w
    x = torch.randn(m, k, requires_grad=True)
    bias = torch.randn(24, requires_grad=True) if with_bias else None
    torch.library.opcheck(linear, (x, w.raw, w.format, w.scale, w.layout, bias))
    torch.library.opcheck(dequantized, (w.raw, w.format, w.scale, w.layout, k, torch.bfloat16))


def test_gradients_are_those_of_the_dequantized_weight():
    w = weight("Q8_0", 16, 64)
    x = torch.randn(2, 5, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    quant_linear(x, w, bias).square().sum().backward()
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, w.dequantize(), bias_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, bias_ref.grad)


def test_tiny_flux_compiles_as_one_graph():
    from flux_model.model import Flux

    state = {name: QTensor.quantize(t, "Q4_0" if "mlp" in name else "Q8_0") if is_block_weight(name) else t
             for name, t in tiny_flux(dtype=torch.float32).items()}
    model = Flux.from_state_dict(state, device="cpu", dtype=torch.float32)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 16, 64, generator=generator), torch.zeros(1, 16, 3),
              torch.randn(1, 8, 32, generator=generator), torch.zeros(1, 8, 3))
    conditioning = dict(timesteps=torch.tensor([0.5]), y=torch.randn(1, 16, generator=generator),
                        guidance=torch.tensor([3.5]))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(*inputs, **conditioning)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        eager = model(*inputs, **conditioning)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(*inputs, **conditioning)
    torch.testing.assert_close(compiled, eager)
