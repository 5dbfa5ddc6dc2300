import os
from pathlib import Path

import numpy as np
import pytest

# Tests build their own tiny models and files; nothing may be fetched from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the environment above)

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. Triton reads this when a kernel is
# decorated, so it must be set before anything imports kernels.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN_VECTORS = Path(__file__).parent / "data" / "ggml_quant_vectors.npz"


@pytest.fixture(scope="session")
def golden():
    """ggml's C reference quantizer applied to 40 rows of 1024 floats: x, q_<TYPE> bytes, y_<TYPE> dequantized."""
    return dict(np.load(GOLDEN_VECTORS))


@pytest.fixture(scope="module")
def linears_in_torch():
    """Whole-model runs on the CPU with the quantized Linears decoded by the torch codecs, as outside the test suite,
    instead of in Triton's interpreter (minutes per model there; tests/test_triton_kernels.py checks the kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("kernels.quant_linear.quant_linear_method", lambda x, weight: "torch")
        yield
