import os
from pathlib import Path

import numpy as np
import pytest

# Tests build their own tiny models and files; nothing may be fetched from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GOLDEN_VECTORS = Path(__file__).parent / "data" / "ggml_quant_vectors.npz"


@pytest.fixture(scope="session")
def golden():
    """ggml's C reference quantizer applied to 40 rows of 1024 floats: x, q_<TYPE> bytes, y_<TYPE> dequantized."""
    return dict(np.load(GOLDEN_VECTORS))
