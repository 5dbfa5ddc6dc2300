"""`FluxPipeline`: prompts in, images out, on the files users have and the GPU they have.

    pipe = FluxPipeline.from_files(transformer="flux1-dev-Q4_K_S.gguf", ae="ae.safetensors",
                                   clip="clip_l.safetensors", t5="t5-v1_1-xxl-encoder-Q8_0.gguf")
    images = pipe("a cat holding a sign", width=1024, height=1024, seed=0)

One call: the text encoders (kept in CPU RAM, results cached) give `txt` and `vec`; every adaLN modulation of the run
is computed up front and the modulation weights (27% of Flux-dev) leave the GPU; the memory planner places the rest
of the transformer (resident, or partly streamed from pinned RAM) and decides whether the VAE decodes in tiles; BFL's
Euler loop runs; the VAE decodes.

LoRAs: `pipe.load_lora("style.safetensors", weight=0.8)` (calls stack), `pipe.set_lora_weights(0.8, -0.3)`,
`pipe.unload_loras()`; `pipe.lora_mode = "merge"` bakes them into the weights instead of adding them at each step
(see `engine.lora`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from engine import sampling
from engine.loading import load_ae, load_flux
from engine.lora import LoRA, LoRAStack, read_lora
from engine.memory import MemoryPlan, plan_memory
from engine.streaming import apply_plan
from engine.text_encoders import TextConditioner
from flux_model import AutoEncoder, Flux


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model was made for: Flux-dev takes 28 steps, guidance 3.5 and a 512-token T5 prompt, with the time
    schedule shifted towards noise; Flux-schnell 4 unshifted steps, 256 tokens and no guidance."""

    steps: int
    guidance: float
    t5_max_length: int
    shift: bool
    true_cfg: float = 1.0  # classifier-free guidance against a negative prompt (1: off); for models without guidance
    width: int = 1024
    height: int = 1024

    @classmethod
    def dev(cls) -> SamplingDefaults:
        return cls(steps=28, guidance=3.5, t5_max_length=512, shift=True)

    @classmethod
    def schnell(cls) -> SamplingDefaults:
        return cls(steps=4, guidance=0.0, t5_max_length=256, shift=False)

    @classmethod
    def for_model(cls, model: Flux) -> SamplingDefaults:
        return cls.dev() if model.params.guidance_embed else cls.schnell()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < 16 or value % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {value}")


class FluxPipeline:
    def __init__(self, transformer: Flux, ae: AutoEncoder, conditioner: TextConditioner, device=None,
                 dtype: torch.dtype = torch.bfloat16, vram: float | None = None,
                 defaults: SamplingDefaults | None = None, files: dict[str, str] | None = None,
                 lora_mode: str = "runtime"):
        """`transformer` as loaded (on the CPU: the pipeline places it), `vram`: the GPU budget in GB (default: what
        the device has free at each call), `lora_mode`: "runtime" or "merge" (see `engine.lora.LoRAStack`)."""
        self.transformer = transformer
        self.ae = ae
        self.conditioner = conditioner
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        self.vram = vram
        self.defaults = defaults or SamplingDefaults.for_model(transformer)
        self.files = files or {}
        self.timings: dict[str, float] = {}
        self._placed: MemoryPlan | None = None
        self._placement = None
        self.loras = LoRAStack(transformer, lora_mode)

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_files(cls, transformer, ae, clip, t5, device=None, dtype: torch.dtype = torch.bfloat16,
                   vram: float | None = None, *, clip_tokenizer=None, t5_tokenizer=None,
                   defaults: SamplingDefaults | None = None, prompt_cache: bool = True) -> FluxPipeline:
        """A pipeline from model files: the transformer (GGUF, safetensors, diffusers folder, FP8, NF4), BFL's
        `ae.safetensors`, CLIP-L and T5 files (see `engine.text_encoders`). Weights stay in CPU memory (memory-mapped
        where the file allows) until a call places them."""
        model = load_flux(transformer, device="cpu", dtype=dtype)
        defaults = defaults or SamplingDefaults.for_model(model)
        autoencoder = load_ae(ae, device="cpu", dtype=dtype)
        conditioner = TextConditioner(clip, t5, clip_tokenizer=clip_tokenizer, t5_tokenizer=t5_tokenizer,
                                      max_length=defaults.t5_max_length, dtype=dtype, cache=prompt_cache)
        files = {"transformer": str(transformer), "ae": str(ae), "clip": str(clip), "t5": str(t5)}
        return cls(model, autoencoder, conditioner, device, dtype, vram, defaults, files)

    @classmethod
    def from_folder(cls, path, device=None, dtype: torch.dtype = torch.bfloat16, vram: float | None = None,
                    *, prompt_cache: bool = True) -> FluxPipeline:
        """A diffusers FLUX.1 folder: `transformer/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer*/`,
        and `scheduler/scheduler_config.json` for the time shift."""
        path = Path(path)
        model = load_flux(path / "transformer", device="cpu", dtype=dtype)
        defaults = replace(SamplingDefaults.for_model(model), **_scheduler_shift(path))
        autoencoder = load_ae(path / "vae", device="cpu", dtype=dtype)
        conditioner = TextConditioner(path, path, max_length=defaults.t5_max_length, dtype=dtype, cache=prompt_cache)
        files = {name: str(path / name) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
        return cls(model, autoencoder, conditioner, device, dtype, vram, defaults, files)

    # ---------------------------------------------------------------------------------------------- LoRAs

    def load_lora(self, path, weight: float = 1.0) -> LoRA:
        """Apply the LoRA in safetensors file `path` (diffusers / PEFT, kohya, XLabs or BFL layout) with `weight`, on
        top of those loaded before. ModelFileError for a file that is not a Flux LoRA."""
        lora = read_lora(path, self.transformer)
        self._unplace()
        self.loras.add(lora, weight)
        return lora

    def set_lora_weights(self, *weights: float) -> None:
        """New weights for the loaded LoRAs, one each, in loading order (0 turns one off); a list works too."""
        if len(weights) == 1 and isinstance(weights[0], (list, tuple)):
            weights = tuple(weights[0])
        self._unplace()  # streamed blocks' staged copies hold the old weights
        self.loras.set_weights(weights)

    def unload_loras(self) -> None:
        self._unplace()
        self.loras.clear()

    @property
    def lora_mode(self) -> str:
        """"runtime": LoRAs added at each step on top of the stored weights; "merge": baked into the weights and
        requantized to their format (slower to load or change, no cost per step, lossy on quantized weights). In merge
        mode every load or weight change merges again: load the LoRAs first, then switch."""
        return self.loras.mode

    @lora_mode.setter
    def lora_mode(self, mode: str) -> None:
        self._unplace()
        self.loras.set_mode(mode)

    def _unplace(self) -> None:
        """Forget the placement: LoRAs change the transformer's tensors, so the next call places them again."""
        if self._placement is not None:
            self._placement.remove()
        self._placement = self._placed = None

    # ---------------------------------------------------------------------------------------------- memory

    def plan(self, width: int, height: int, batch_size: int = 1, steps: int | None = None) -> MemoryPlan:
        """Where everything goes for this call (`--plan` prints it)."""
        budget = None if self.vram is None else int(self.vram * 2**30)
        if self.device.type != "cuda" and budget is None:
            budget = 2**62  # CPU memory is not planned: the weights are memory-mapped, nothing is copied
        cfg_batch = 2 if self.defaults.true_cfg != 1.0 else 1
        return plan_memory(self.transformer, width=width, height=height, batch_size=batch_size * cfg_batch,
                           txt_len=self.defaults.t5_max_length, num_steps=steps or self.defaults.steps,
                           autoencoder=self.ae, budget=budget, device=self.device)

    def _place(self, plan: MemoryPlan) -> None:
        same = self._placed is not None and (self._placed.streamed_double, self._placed.streamed_single) == (
            plan.streamed_double, plan.streamed_single)
        if not same:
            if self._placement is not None:
                self._placement.remove()
            self._placement = apply_plan(self.transformer, plan, self.device)
            self._placed = plan
        self.ae.decoder.to(self.device)  # text-to-image never encodes: the encoder stays in CPU memory

    @torch.inference_mode()
    def _modulations(self, timesteps: list[float], vec: torch.Tensor, guidance: float, plan: MemoryPlan):
        """Every adaLN output of the run; the embedders and modulation Linears run on the GPU when they fit beside the
        rest (else on the CPU) and are left in CPU memory for the next prompt."""
        if plan.precompute_on_device:
            for module in self.transformer.vec_modules():
                module.to(self.device)
        t = torch.tensor(timesteps[:-1], dtype=torch.float32)
        g = torch.full((vec.shape[0],), guidance, dtype=torch.float32) if self.transformer.params.guidance_embed else None
        mods = self.transformer.precompute_modulations(t, vec, g, device=self.device)
        self.transformer.offload_modulation_weights("cpu")
        return mods

    # ---------------------------------------------------------------------------------------------- generation

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], width: int | None = None, height: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 latents: torch.Tensor | None = None, output_type: str = "pil", callback=None, *,
                 true_cfg: float | None = None, negative_prompt: str = "", progress: bool = True):
        """Images for `prompt` (one or a list): PIL images, or with `output_type="latent"` the final latents
        (B, 16, H/8, W/8) before the VAE. `latents` (B, 16, H/8, W/8) replace the seeded noise. `callback(i, latents)`
        runs after step i. `true_cfg` > 1: classifier-free guidance against `negative_prompt` (two passes a step).
        Timings of the last call are in `self.timings` (seconds)."""
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        width, height = width or self.defaults.width, height or self.defaults.height
        check_size(width, height)
        steps = steps or self.defaults.steps
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        guidance = self.defaults.guidance if guidance is None else guidance
        true_cfg = self.defaults.true_cfg if true_cfg is None else true_cfg
        batch = len(prompts)
        shape = (batch, sampling.LATENT_CHANNELS, height // 8, width // 8)
        if latents is None:
            latents = sampling.get_noise(batch, height, width, self.device, self.dtype, seed)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        start = time.perf_counter()

        txt, vec = self.conditioner.encode(prompts, device=self.device)
        negative = None
        if true_cfg != 1.0:
            negative = self.conditioner.encode([negative_prompt] * batch, device=self.device)
        encoded = time.perf_counter()

        plan = self.plan(width, height, batch, steps)
        timesteps = sampling.get_schedule(steps, (height // 16) * (width // 16), shift=self.defaults.shift)
        mods = self._modulations(timesteps, vec, guidance, plan)
        neg_mods = None if negative is None else self._modulations(timesteps, negative[1], guidance, plan)
        self._place(plan)
        inputs = sampling.prepare(latents.to(self.device, self.dtype), txt.to(self.dtype), vec)
        if negative is not None:
            negative = (negative[0].to(self.dtype), negative[1])
        prepared = time.perf_counter()

        bar = tqdm(total=steps, desc="denoising", unit="step", disable=not progress, dynamic_ncols=True)
        step_times = []

        def on_step(i, img):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_times.append(time.perf_counter())
            bar.update()
            if callback is not None:
                callback(i, img)

        img = sampling.denoise(self.transformer, inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"],
                               None, timesteps, guidance, modulations=mods, true_cfg=true_cfg, negative=negative,
                               negative_modulations=neg_mods, callback=on_step)
        bar.close()
        denoised = time.perf_counter()
        latents_out = sampling.unpack(img.float(), height, width)
        self.timings = {"encode": encoded - start, "prepare": prepared - encoded, "denoise": denoised - prepared,
                        "per_step": (denoised - prepared) / steps}
        if output_type == "latent":
            self.timings["total"] = time.perf_counter() - start
            return latents_out
        pixels = self.ae.decode(latents_out, tile=plan.vae_tile)
        images = to_pil(pixels)
        self.timings["decode"] = time.perf_counter() - denoised
        self.timings["total"] = time.perf_counter() - start
        return images


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images (BFL: clamp, then (x + 1) * 127.5 rounded down)."""
    array = (pixels.float().clamp(-1, 1).add(1).mul(127.5)).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def _scheduler_shift(folder: Path) -> dict:
    """The time shift a diffusers folder's scheduler config asks for (`use_dynamic_shifting`)."""
    config = folder / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return {}
    try:
        return {"shift": bool(json.loads(config.read_text()).get("use_dynamic_shifting", True))}
    except (OSError, ValueError):
        return {}
