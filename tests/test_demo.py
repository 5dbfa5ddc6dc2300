"""The demo model that ships with the package: every file loads through the public loaders in the layout users
have, the GGUF is the BF16 original quantized, and `python -m engine.generate` makes a picture with no model flags."""

import json

import pytest
import torch
from PIL import Image

from engine import demo
from engine.generate import main
from engine.loading import load_ae, load_flux
from engine.text_encoders import load_clip, load_t5
from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear

MAX_SHIPPED_BYTES = 30 * 10**6


def test_shipped_files_fit_the_size_budget():
    paths = [p for p in demo.DEMO_DIR.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in paths) <= MAX_SHIPPED_BYTES


def test_transformer_files_load_and_the_gguf_is_the_bf16_original_in_q8_0():
    gguf = load_flux(demo.files()["transformer"], dtype=torch.float32)
    bf16 = load_flux(demo.files("transformer_bf16")["transformer"], dtype=torch.float32)
    assert gguf.params == bf16.params
    quantized = {name: m for name, m in gguf.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and {m.format for m in quantized.values()} == {"Q8_0"}
    dense = dict(bf16.named_modules())
    for name, module in quantized.items():
        expected = QTensor.quantize(dense[name].weight.detach(), "Q8_0")
        assert torch.equal(module.raw, expected.raw), name


def test_autoencoder_and_text_encoders_load():
    files = demo.files()
    ae = load_ae(files["ae"])
    assert ae.params.z_channels == 16 and ae.params.norm_groups == 8
    clip = load_clip(files["clip"], tokenizer=files["clip_tokenizer"], dtype=torch.float32)
    t5 = load_t5(files["t5"], max_length=demo.manifest()["defaults"]["t5_max_length"], dtype=torch.float32)
    prompt = ["a red circle on a blue background"]
    assert t5.encode(prompt).shape[:2] == (1, demo.manifest()["defaults"]["t5_max_length"])
    assert clip.encode(prompt).shape[0] == 1


def test_text_encoders_tell_the_object_color_from_the_background():
    """The demo's encoders were pre-trained to parse the grammar (bench.train_demo): swapping the two colors changes
    T5's mean token output and CLIP's pooled output by more than half their size. Left random, T5's changed by 0.7%
    and CLIP's by 17%, and the transformer swapped the colors in 8% of held-out images."""
    files = demo.files()
    t5 = load_t5(files["t5"], max_length=demo.manifest()["defaults"]["t5_max_length"], dtype=torch.float32)
    clip = load_clip(files["clip"], tokenizer=files["clip_tokenizer"], dtype=torch.float32)
    prompts = ["a red circle on a blue background", "a blue circle on a red background"]
    tokens = t5.encode(prompts).mean(dim=1)
    pooled = clip.encode(prompts)
    for a, b in (tokens, pooled):
        assert (a - b).norm() > 0.5 * a.norm()


def test_generate_without_model_flags_uses_the_demo(tmp_path, monkeypatch, linears_in_torch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "demo.png"
    assert main(["a red circle on a blue background", "--steps", "2", "--out", str(out)]) == 0
    image = Image.open(out)
    size = demo.manifest()["defaults"]["width"], demo.manifest()["defaults"]["height"]
    assert image.size == size
    params = json.loads(image.text["flux-quant-engine"])
    assert params["prompt"] == "a red circle on a blue background" and params["steps"] == 2


def test_missing_demo_gives_one_clear_error(tmp_path, monkeypatch):
    from engine.errors import ModelFileError

    monkeypatch.setattr(demo, "MANIFEST", tmp_path / "demo.json")
    with pytest.raises(ModelFileError, match="the demo model is not installed"):
        demo.manifest()
