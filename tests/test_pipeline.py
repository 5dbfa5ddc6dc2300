"""FluxPipeline against diffusers' FluxPipeline on the same tiny components (a diffusers FLUX.1 folder written by the
test), dev-style (guidance embedding, shifted schedule) and schnell-style; determinism; the demo layout of files."""

import json

import pytest
import torch

from engine.pipeline import FluxPipeline
from tests.text_encoder_fixtures import tiny_clip, tiny_t5, train_clip_tokenizer, train_t5_tokenizer

diffusers = pytest.importorskip("diffusers")

HEAD_DIM, HEADS = 32, 2


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def write_diffusers_folder(root, guidance: bool):
    t5_tokenizer = train_t5_tokenizer(root / "tokenizer_2")
    clip_tokenizer = train_clip_tokenizer(root / "tokenizer")
    clip_tokenizer.model_max_length = 77  # as CLIP-L's tokenizer config says; diffusers reads it
    clip_tokenizer.save_pretrained(root / "tokenizer")
    tiny_t5(len(t5_tokenizer), seed=1).save_pretrained(root / "text_encoder_2")
    tiny_clip(len(clip_tokenizer), seed=2).save_pretrained(root / "text_encoder")
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=64, pooled_projection_dim=128, guidance_embeds=guidance,
        axes_dims_rope=[HEAD_DIM // 8, 7 * HEAD_DIM // 16, 7 * HEAD_DIM // 16])
    _randomize(transformer, 3).save_pretrained(root / "transformer")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)
    vae.save_pretrained(root / "vae")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance else 1.0, use_dynamic_shifting=guidance, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module", params=["dev", "schnell"])
def folder(request, tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp(request.param), guidance=request.param == "dev")


def reference_pipeline(folder):
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"),
        transformer=diffusers.FluxTransformer2DModel.from_pretrained(folder / "transformer"))


def test_final_latents_equal_diffusers_flux_pipeline(folder):
    ours = FluxPipeline.from_folder(folder, device="cpu", dtype=torch.float32, prompt_cache=False)
    dev = ours.transformer.params.guidance_embed
    assert ours.defaults.shift == dev and ours.defaults.t5_max_length == (512 if dev else 256)
    prompts = ["a red circle on a blue background", "a photo of a cat"]
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    got = ours(prompts, width=96, height=64, steps=3, guidance=3.5, latents=latents, output_type="latent",
               progress=False)
    ref = reference_pipeline(folder)
    from engine.sampling import pack, unpack

    want = ref(prompts, width=96, height=64, num_inference_steps=3, guidance_scale=3.5, latents=pack(latents),
               output_type="latent", max_sequence_length=ours.defaults.t5_max_length).images
    want = unpack(want, 64, 96)
    assert got.shape == want.shape == (2, 16, 8, 12)
    rel = (got - want).norm() / want.norm()
    assert rel <= 1e-4, rel
    assert (got - latents).abs().mean() > 0.1  # the model really moved the latents


def test_same_seed_same_image_and_images_are_pil(folder):
    pipe = FluxPipeline.from_folder(folder, device="cpu", dtype=torch.float32, prompt_cache=False)
    a = pipe("a dog", width=64, height=64, steps=2, seed=3, progress=False)
    b = pipe("a dog", width=64, height=64, steps=2, seed=3, progress=False)
    c = pipe("a dog", width=64, height=64, steps=2, seed=4, progress=False)
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert a[0].tobytes() == b[0].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    assert set(pipe.timings) >= {"encode", "denoise", "per_step", "decode", "total"}


def test_bad_calls_raise_value_errors(folder):
    pipe = FluxPipeline.from_folder(folder, device="cpu", dtype=torch.float32, prompt_cache=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe("x", width=72, height=64, steps=1)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("x", width=64, height=64, steps=1, latents=torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", width=64, height=64, steps=1, output_type="np")


def test_scheduler_config_decides_the_shift(tmp_path, folder):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["use_dynamic_shifting"] == FluxPipeline.from_folder(folder, device="cpu", prompt_cache=False,
                                                                       dtype=torch.float32).defaults.shift
