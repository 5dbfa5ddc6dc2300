"""How far a quantized run lands from the reference run: image metrics from scikit-image, latent and weight errors,
and their spread across runs."""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.quality.levels import level_format, stored_as
from kernels.qtensor import QTensor


def image_psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR of two uint8 (H, W, 3) images in dB; inf when they are identical."""
    if np.array_equal(reference, image):
        return math.inf  # scikit-image divides by a zero MSE (and warns) to get the same
    return float(peak_signal_noise_ratio(reference, image, data_range=255))


def image_ssim(reference: np.ndarray, image: np.ndarray) -> float:
    return float(structural_similarity(reference, image, channel_axis=-1, data_range=255))


def relative_rmse(reference: torch.Tensor, value: torch.Tensor) -> float:
    """||value - reference|| / ||reference||."""
    reference, value = reference.double(), value.double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def cosine_similarity(reference: torch.Tensor, value: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(reference.double().flatten(), value.double().flatten(), dim=0))


def spread(values, higher_is_better: bool) -> dict[str, float]:
    """Mean, standard deviation and worst case of one metric over runs. For PSNR, identical images (inf) count in
    the worst case but not in the mean and deviation, which are over the finite values (nan when none are)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    worst = values.min() if higher_is_better else values.max()
    return {"mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std()) if finite.size else math.nan,
            "worst": float(worst), "identical": int((~np.isfinite(values)).sum())}


# BFL names -> the kind of layer they are, for the per-layer weight errors
TENSOR_KINDS = (
    ("attention qkv", re.compile(r"double_blocks\.\d+\.(img|txt)_attn\.qkv\.weight$")),
    ("attention proj", re.compile(r"double_blocks\.\d+\.(img|txt)_attn\.proj\.weight$")),
    ("MLP", re.compile(r"double_blocks\.\d+\.(img|txt)_mlp\.[02]\.weight$")),
    ("single-block linears", re.compile(r"single_blocks\.\d+\.linear[12]\.weight$")),
    ("modulation", re.compile(r"(double_blocks\.\d+\.(img|txt)_mod|single_blocks\.\d+\.modulation)\.lin\.weight$")),
)
KINDS = tuple(kind for kind, _ in TENSOR_KINDS)


def tensor_kind(name: str) -> str | None:
    return next((kind for kind, pattern in TENSOR_KINDS if pattern.search(name)), None)


def dense_value(t) -> torch.Tensor:
    """A stored tensor's float32 value (decoded when it is a QTensor)."""
    return t.dequantize(torch.float32) if isinstance(t, QTensor) else t.detach().float()


def weight_errors(reference: dict[str, torch.Tensor], quantized: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Relative RMSE of every block weight, grouped by kind: mean and worst over the kind's tensors."""
    by_kind: dict[str, list[float]] = {}
    for name, weight in reference.items():
        kind = tensor_kind(name)
        if kind is not None:
            by_kind.setdefault(kind, []).append(relative_rmse(weight, quantized[name]))
    return {kind: {"mean": float(np.mean(v)), "worst": float(np.max(v)), "tensors": len(v)}
            for kind, v in by_kind.items()}


# One tensor of every kind at Flux-dev's shapes (hidden 3072, MLP 12288), the row length being what block formats see
FLUX_DEV_SHAPES = {
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.img_attn.proj.weight": (3072, 3072),
    "double_blocks.0.img_mlp.0.weight": (12288, 3072), "double_blocks.0.img_mlp.2.weight": (3072, 12288),
    "single_blocks.0.linear1.weight": (21504, 3072), "single_blocks.0.linear2.weight": (3072, 15360),
    "double_blocks.0.img_mod.lin.weight": (18432, 3072), "single_blocks.0.modulation.lin.weight": (9216, 3072),
}
SYNTHETIC_ROWS = 256  # rows drawn per tensor: the error of a row depends only on its own values


def synthetic_flux_dev_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Flux-dev-shaped rows (no real weights ship with the project): Student-t with 5 degrees of freedom at scale
    0.02, heavy-tailed as trained weights are, so a block's range is set by its outliers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (_, k) in FLUX_DEV_SHAPES.items():
        normal = torch.randn((SYNTHETIC_ROWS, k), generator=g, dtype=torch.float64)
        chi2 = torch.randn((SYNTHETIC_ROWS, k, 5), generator=g, dtype=torch.float64).pow(2).sum(-1)
        out[name] = (0.02 * normal / (chi2 / 5).sqrt()).float()
    return out


def flux_dev_weight_errors(levels: list[str]) -> dict[str, dict]:
    """Per level, the weight error by kind on `synthetic_flux_dev_weights`, each quantized as the level stores it."""
    weights = synthetic_flux_dev_weights()
    out = {}
    for level in levels:
        quantized = {name: stored_as(w, level_format(level, name, FLUX_DEV_SHAPES[name])) for name, w in weights.items()}
        out[level] = weight_errors(weights, {name: dense_value(t) for name, t in quantized.items()})
    return out
