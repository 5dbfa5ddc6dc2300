"""bench.quality: its metrics on cases with known answers, the level ordering on the shipped demo weights, the FLOP
count against torch's counter, and a whole small run writing every output file."""

import json
import math

import numpy as np
import pytest
import torch

from bench.quality import levels as lv
from bench.quality import metrics, report, vram
from bench.quality.__main__ import main
from engine.checkpoints import load_checkpoint
from engine.demo import files as demo_files
from flux_model import Flux, FluxConfig
from kernels.qtensor import QTensor


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert metrics.image_psnr(image, image) == math.inf
    assert metrics.image_ssim(image, image) == pytest.approx(1.0)


def test_additive_noise_of_known_level_gives_its_psnr():
    rng = np.random.default_rng(1)
    image = rng.integers(40, 216, (48, 48, 3)).astype(np.uint8)
    noisy = (image.astype(np.int16) + 5 * rng.choice([-1, 1], image.shape)).astype(np.uint8)  # MSE exactly 25
    assert metrics.image_psnr(image, noisy) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)
    assert metrics.image_ssim(image, noisy) < 1.0


def test_latent_metrics_on_known_values():
    a = torch.tensor([3.0, 4.0])
    assert metrics.relative_rmse(a, a * 1.1) == pytest.approx(0.1)
    assert metrics.cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert metrics.cosine_similarity(a, torch.tensor([-4.0, 3.0])) == pytest.approx(0.0)


def test_spread_counts_identical_runs_only_in_the_worst_case():
    s = metrics.spread([math.inf, 30.0, 40.0], higher_is_better=True)
    assert (s["mean"], s["std"], s["worst"], s["identical"]) == (35.0, 5.0, 30.0, 1)
    assert metrics.spread([0.1, 0.3], higher_is_better=False)["worst"] == 0.3


def test_tensor_kinds():
    assert metrics.tensor_kind("double_blocks.3.txt_attn.qkv.weight") == "attention qkv"
    assert metrics.tensor_kind("double_blocks.0.img_mlp.2.weight") == "MLP"
    assert metrics.tensor_kind("single_blocks.7.linear2.weight") == "single-block linears"
    assert metrics.tensor_kind("single_blocks.7.modulation.lin.weight") == "modulation"
    assert metrics.tensor_kind("final_layer.linear.weight") is None


def test_levels_order_on_the_demo_weights():
    """Q8_0 closer than Q4_0, Q4_0 closer than Q2_K, on every kind of block weight of the shipped model."""
    reference = load_checkpoint(demo_files("transformer_bf16")["transformer"])
    dense = {name: t.float() for name, t in reference.items()}
    errors = {}
    for level in ("Q8_0", "Q4_0", "Q2_K"):
        stored = lv.quantized_in_memory(reference, level)
        errors[level] = metrics.weight_errors(dense, {n: metrics.dense_value(t) for n, t in stored.items()})
        assert all(isinstance(stored[n], QTensor) for n in dense if metrics.tensor_kind(n))
    for kind in metrics.KINDS:
        assert errors["Q8_0"][kind]["mean"] < errors["Q4_0"][kind]["mean"] < errors["Q2_K"][kind]["mean"], kind


def test_step_flops_match_torch_flop_counter():
    """The throughput model's FLOPs against torch's count of one real forward (blocks only: the modulations are
    precomputed, and img_in / txt_in / the final layer are counted out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                        mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=3, axes_dim=[8, 12, 12],
                        theta=10_000, qkv_bias=True, guidance_embed=False)
    model = Flux(config).eval()
    img_tokens, txt_tokens = 24, 8
    img, txt = torch.randn(1, img_tokens, 64), torch.randn(1, txt_tokens, 32)
    img_ids, txt_ids = torch.zeros(1, img_tokens, 3), torch.zeros(1, txt_tokens, 3)
    timesteps, vec = torch.tensor([0.5]), torch.randn(1, 32)
    mods = model.precompute_modulations(timesteps, vec, None)
    # the math backend runs attention as matmuls the counter sees (the CPU's fused kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(img, img_ids, txt, txt_ids, modulations=mods, step=0)
    edges = 2 * (img_tokens * 64 * 64 + txt_tokens * 32 * 64 + img_tokens * 64 * 64)  # img_in, txt_in, final
    assert vram.step_flops(config, img_tokens, txt_tokens) == counter.get_total_flops() - edges


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory, linears_in_torch):
    out = tmp_path_factory.mktemp("quality")
    assert main(["--levels", "Q8_0,NF4,FP8", "--prompts", "2", "--seeds", "2", "--steps", "2", "--out", str(out),
                 "--cache", str(out / "cache")]) == 0
    return out


def test_every_output_file_is_written(report_folder):
    for name in report.FILES:
        assert (report_folder / name).stat().st_size > 0, name
    results = json.loads((report_folder / "results.json").read_text())
    assert list(results["levels"]) == ["Q8_0", "NF4", "FP8"]
    assert len(results["levels"]["NF4"]["runs"]["psnr"]) == 4
    assert len(results["levels"]["NF4"]["step_error"]["mean"]) == 2
    text = (report_folder / "report.md").read_text()
    for needle in ("not Flux-dev", "## What to run", "Q6_K for 16 GB cards\"**: not measurable here",
                   "Q4_0 is closer to FP16 than NF4 (under 10 GB)\"**: not measurable here"):
        assert needle in text, needle
    from PIL import Image

    assert Image.open(report_folder / "grid.png").size[1] == 4 * 128  # reference and three levels, one row each


def test_reference_outputs_come_from_the_cache(report_folder, linears_in_torch):
    cached = sorted((report_folder / "cache").rglob("reference-*/*.safetensors"))
    assert len(cached) == 4
    before = [p.stat().st_mtime_ns for p in cached]
    out = report_folder / "again"
    assert main(["--levels", "Q8_0", "--prompts", "2", "--seeds", "2", "--steps", "2", "--out", str(out),
                 "--cache", str(report_folder / "cache")]) == 0
    assert [p.stat().st_mtime_ns for p in cached] == before


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown level 'Q9_0'"):
        main(["--levels", "Q9_0"])
