"""LoRAs on the Flux transformer: every file layout against diffusers' `load_lora_weights` (or dense weights plus the
deltas, computed here from the file's tensors), runtime LoRAs on quantized weights against "dequantize, add the delta,
matmul", merge mode, the memory plan, block streaming and bad files."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ModelFileError
from engine.lora import LoRA, LoRALinear, LoRAStack, LoRAUpdate, read_lora
from engine.lora.merge import merged_linear
from engine.lora.runtime import linear_modules
from engine.pipeline import FluxPipeline
from engine.sampling import pack, unpack
from kernels.formats import get_format
from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear
from tests.flux_fixtures import flux_shapes
from tests.lora_fixtures import diffusers_rows, kohya_from_peft, peft_lora, random_factors, write
from tests.test_pipeline import HEAD_DIM, HEADS, reference_pipeline, write_diffusers_folder

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPTS = ["a red circle on a blue background", "a photo of a cat"]
WIDTH, HEIGHT, STEPS = 48, 32, 2
TINY = dict(hidden=HEADS * HEAD_DIM, heads=HEADS, depth=1, depth_single=2, guidance=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("flux"), guidance=True)


@pytest.fixture(scope="module")
def start_latents():
    return torch.randn(2, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))


def ours(pipe, latents):
    return pipe(PROMPTS, width=WIDTH, height=HEIGHT, steps=STEPS, guidance=3.5, latents=latents,
                output_type="latent", progress=False)


def theirs(folder, lora_path, latents):
    """diffusers' FluxPipeline with the LoRA loaded by its `load_lora_weights` (PEFT)."""
    ref = reference_pipeline(folder)
    ref.load_lora_weights(str(lora_path))
    out = ref(PROMPTS, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, guidance_scale=3.5,
              latents=pack(latents), output_type="latent", max_sequence_length=512).images
    return unpack(out, HEIGHT, WIDTH)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pipe(folder):
    return FluxPipeline.from_folder(folder, device="cpu", dtype=torch.float32, prompt_cache=False)


@pytest.fixture(scope="module")
def peft_file(folder, tmp_path_factory):
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(folder / "transformer")
    path = tmp_path_factory.mktemp("loras") / "peft.safetensors"
    return write(peft_lora(transformer, rank=4, alpha=8.0, seed=10), path)


@pytest.fixture(scope="module")
def peft_reference(folder, peft_file, start_latents):
    return theirs(folder, peft_file, start_latents)


def test_peft_lora_equals_diffusers_load_lora_weights(pipe, peft_file, peft_reference, start_latents):
    base = ours(pipe, start_latents)
    lora = pipe.load_lora(peft_file)
    try:
        got = ours(pipe, start_latents)
    finally:
        pipe.unload_loras()
    assert lora.format == "diffusers" and set(lora.modules) == set(linear_modules(pipe.transformer))  # every Linear
    rel = relative(got, peft_reference)
    print(f"PEFT LoRA vs diffusers: max relative error {rel:.2e}")
    assert rel <= 1e-4, rel
    assert relative(base, peft_reference) > 0.05  # the LoRA really changed the result
    assert relative(ours(pipe, start_latents), base) == 0  # unloaded: the model is as it was


def test_kohya_rewrite_on_bfl_names_gives_the_same_latents(pipe, peft_file, peft_reference, start_latents, tmp_path):
    from safetensors.torch import load_file

    rows = diffusers_rows(**TINY)
    out_features = {name[:-len(".weight")]: shape[0] for name, shape in flux_shapes(**TINY).items()}
    path = write(kohya_from_peft(load_file(str(peft_file)), rows, out_features), tmp_path / "kohya.safetensors")
    lora = pipe.load_lora(path)
    try:
        got = ours(pipe, start_latents)
    finally:
        pipe.unload_loras()
    assert lora.format == "kohya"
    rel = relative(got, peft_reference)
    print(f"kohya rewrite vs diffusers' PEFT result: relative error {rel:.2e}")
    assert rel <= 1e-4, rel
