"""The Triton kernels against the numpy reference: without a GPU they run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), with one on CUDA tensors."""

import numpy as np
import pytest
import torch

from kernels import QTensor, dispatch, reference
from kernels.quant_linear import QuantLinear, quant_linear
from kernels.triton.decode import KERNEL_FORMATS
from kernels.triton.ops import dequant_matmul_triton, dequantize_triton, interpreting, quant_linear_triton

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 72, 512  # N: not a multiple of any tile; K: two K-quant super-blocks, sixteen 32-element blocks
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if not interpreting() else [])  # bf16 tl.dot is wrong
# in the interpreter


def quantized_weight(fmt, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    raw = reference.quantize(w, fmt)
    dense = torch.from_numpy(reference.dequantize(raw, fmt))  # the independent decoding
    return QTensor(torch.from_numpy(raw).to(DEVICE), fmt, (N, K)), dense


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_dequant_kernel_equals_reference(fmt):
    weight, dense = quantized_weight(fmt)
    assert torch.equal(dequantize_triton(weight, torch.float32).cpu(), dense)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_fused_matmul_equals_reference(fmt, M, dtype):
    weight, dense = quantized_weight(fmt, seed=M)
    rng = np.random.default_rng(100 + M)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    with_bias = M % 2 == 1  # bias on for M = 1, 3, 17
    bias = torch.from_numpy(rng.standard_normal(N).astype(np.float32)) if with_bias else None
    expected = x.double() @ dense.double().T + (bias.double() if with_bias else 0)
    y = quant_linear_triton(x.to(dtype).to(DEVICE), weight, None if bias is None else bias.to(dtype).to(DEVICE))
    assert y.dtype == dtype and y.shape == (M, N)
    error = (y.double().cpu() - expected).norm() / expected.norm()
    assert error <= TOLERANCE[dtype], float(error)


def test_quant_linear_dispatch_and_module():
    weight, dense = quantized_weight("Q4_K")
    x = torch.randn(2, 5, K).to(DEVICE)  # leading dims are kept
    bias = torch.randn(N).to(DEVICE)
    layer = QuantLinear(weight, bias)
    y = layer(x)
    assert y.shape == (2, 5, N)
    expected = x.double().cpu() @ dense.double().T + bias.double().cpu()
    assert (y.double().cpu() - expected).norm() / expected.norm() < 1e-3
    with pytest.raises(ValueError, match="does not match"):
        quant_linear(torch.randn(3, K + 1).to(DEVICE), weight)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        quant_linear(torch.ones(3, K, dtype=torch.float64).to(DEVICE), weight)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0", "NF4"])
def test_dequantize_into_scratch_then_matmul(fmt):
    weight, dense = quantized_weight(fmt)
    x = torch.randn(5, K)
    bias = torch.randn(N)
    y = dequant_matmul_triton(x.to(DEVICE), weight, bias.to(DEVICE))
    expected = x.double() @ dense.double().T + bias.double()
    assert (y.double().cpu() - expected).norm() / expected.norm() < 1e-3
    small, _ = quantized_weight("Q4_0")  # the scratch buffer is reused for a smaller weight
    assert dequant_matmul_triton(x.to(DEVICE), small, None).shape == (5, N)


def test_quant_linear_follows_the_measured_dispatch_table(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    dispatch.write_table("Fake GPU 80GB", {"Q4_K@16": "dequant_matmul", "Q4_K@512": "fused"}, "test")
    assert dispatch.table_path("Fake GPU 80GB").name == "fake-gpu-80gb.json"
    # buckets: M=1 -> 1 (no entry), 3 and 16 -> 16, 17 -> 512, 9000 -> 4096 (no entry)
    assert [dispatch.method("Q4_K", M, "Fake GPU 80GB") for M in (1, 3, 16, 17, 9000)] == [
        "fused", "dequant_matmul", "dequant_matmul", "fused", "fused"]
    assert dispatch.method("Q8_0", 16, "Fake GPU 80GB") == "fused"  # formats without an entry: fused
    assert dispatch.method("Q4_K", 16, "Unmeasured GPU") == "fused"
    with pytest.raises(ValueError, match="unknown dispatch methods"):
        dispatch.write_table("Fake GPU 80GB", {"Q4_K@16": "cublas"}, "test")

    weight, dense = quantized_weight("Q4_K")
    calls = []
    monkeypatch.setattr(dispatch, "method_for", lambda fmt, M, device: calls.append((fmt, M)) or "dequant_matmul")
    x = torch.randn(4, K).to(DEVICE)
    y = quant_linear(x, weight)
    assert calls == [("Q4_K", 4)]
    expected = x.double().cpu() @ dense.double().T
    assert (y.double().cpu() - expected).norm() / expected.norm() < 1e-3
