"""The same prompts and seeds through the pipeline at every level; the reference's outputs cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bench.quality import metrics


@dataclass(frozen=True)
class RunSettings:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    width: int
    height: int

    def runs(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]


@dataclass
class RunOutput:
    image: np.ndarray  # (H, W, 3) uint8
    latents: torch.Tensor  # final latents before the VAE, packed (tokens, channels), float32
    trajectory: torch.Tensor  # (steps, tokens, channels): the packed latents after every step, float32


def generate(pipe, prompt: str, seed: int, settings: RunSettings) -> RunOutput:
    trajectory = []
    image = pipe(prompt, width=settings.width, height=settings.height, steps=settings.steps, seed=seed,
                 progress=False, callback=lambda i, img: trajectory.append(img[0].float().cpu().clone()))[0]
    # the last step's packed latents are the final latents (same numbers, in token order)
    return RunOutput(np.asarray(image), trajectory[-1], torch.stack(trajectory))


def reference_outputs(pipe, settings: RunSettings, cache: Path, progress) -> list[RunOutput]:
    """The reference run of every (prompt, seed), read from `cache` when an earlier run with the same settings,
    pipeline settings and reference left it there."""
    identity = json.dumps({"settings": asdict(settings), "dtype": str(pipe.dtype), "device": pipe.device.type,
                           "defaults": asdict(pipe.defaults)}, sort_keys=True)
    folder = cache / ("reference-" + hashlib.sha1(identity.encode()).hexdigest()[:16])
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    for i, (prompt, seed) in enumerate(settings.runs()):
        path = folder / f"{i}.safetensors"
        if path.exists():
            t = load_file(str(path))
            outputs.append(RunOutput(t["image"].numpy(), t["latents"], t["trajectory"]))
        else:
            out = generate(pipe, prompt, seed, settings)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"image": torch.from_numpy(out.image.copy()), "latents": out.latents, "trajectory": out.trajectory},
                      str(tmp))
            os.replace(tmp, path)
            outputs.append(out)
        progress.update()
    return outputs


def compare_level(pipe, settings: RunSettings, references: list[RunOutput], progress) -> dict:
    """Every run at this level against its reference: per-run metrics, the latent error after every step (mean and
    worst over runs), s/step, and the first seed's image of each prompt (for the grid)."""
    per_run = {"psnr": [], "ssim": [], "latent_cosine": [], "latent_rel_rmse": []}
    step_errors, step_times, images = [], [], []
    for (prompt, seed), ref in zip(settings.runs(), references):
        out = generate(pipe, prompt, seed, settings)
        step_times.append(pipe.timings["per_step"])
        per_run["psnr"].append(metrics.image_psnr(ref.image, out.image))
        per_run["ssim"].append(metrics.image_ssim(ref.image, out.image))
        per_run["latent_cosine"].append(metrics.cosine_similarity(ref.latents, out.latents))
        per_run["latent_rel_rmse"].append(metrics.relative_rmse(ref.latents, out.latents))
        step_errors.append([metrics.relative_rmse(r, o) for r, o in zip(ref.trajectory, out.trajectory)])
        if seed == settings.seeds[0]:
            images.append(out.image)
        progress.update()
    steps = np.asarray(step_errors)
    return {"runs": per_run,
            "summary": {name: metrics.spread(values, higher_is_better=name != "latent_rel_rmse")
                        for name, values in per_run.items()},
            "step_error": {"mean": steps.mean(axis=0).tolist(), "worst": steps.max(axis=0).tolist()},
            "seconds_per_step": float(np.mean(step_times)), "images": images}
