"""Models from files: `load_flux(path)` and `load_ae(path)`.

`flux_model` holds the math and builds models from state dicts (`Flux.from_state_dict`, `AutoEncoder.from_state_dict`,
ValueError on a mismatch); reading files, and naming the file in every error, happens here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoints import load_checkpoint
from engine.checkpoints.diffusers_vae import read_vae_folder
from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError
from flux_model import AutoEncoder, AutoEncoderParams, Flux
from flux_model.autoencoder import infer_params

# Full checkpoints (LDM, ComfyUI) store the VAE under one of these prefixes.
AE_PREFIXES = ("first_stage_model.", "vae.")
# Autoencoder settings a file may state (safetensors metadata or a diffusers config) rather than FLUX's.
AE_SETTINGS = {"scale_factor": float, "shift_factor": float, "norm_groups": int}
# What building a model from wrong tensors raises; wrapped into a ModelFileError naming the file.
_MODEL_ERRORS = (ValueError, KeyError, IndexError, TypeError, RuntimeError)


def _problem(e: Exception) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def load_flux(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> Flux:
    """The Flux transformer in any file `engine.checkpoints.load_checkpoint` reads (GGUF, safetensors in BFL,
    ComfyUI or diffusers layouts, FP8, Forge NF4). Quantized Linears stay quantized (`QuantLinear`); dense tensors
    are cast to `dtype` on `device`. A broken, foreign or mismatched file raises ModelFileError naming it."""
    state_dict = load_checkpoint(path)
    try:
        return Flux.from_state_dict(state_dict, device=device, dtype=dtype)
    except _MODEL_ERRORS as e:
        raise ModelFileError(path, _problem(e)) from None


def load_ae(path, device="cpu", dtype: torch.dtype = torch.float32,
            params: AutoEncoderParams | None = None) -> AutoEncoder:
    """BFL's `ae.safetensors` (keys `encoder.*`, `decoder.*`; a `vae.` / `first_stage_model.` prefix on every key is
    stripped) or a diffusers `vae/` folder. `params` defaults to the architecture read off the tensor shapes, with
    FLUX's latent scale/shift and 32 GroupNorm groups unless the file says otherwise: safetensors metadata keys
    "scale_factor", "shift_factor", "norm_groups" (the shipped demo autoencoder has them), or a folder's config.json.
    Any problem raises ModelFileError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    try:
        if path.is_dir():
            tensors, settings = read_vae_folder(path)
        else:
            tensors, metadata = read_safetensors(path)
            for prefix in AE_PREFIXES:
                if tensors and all(k.startswith(prefix) for k in tensors):
                    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            settings = {k: metadata[k] for k in AE_SETTINGS if k in metadata}
        if params is None:
            params = infer_params(tensors)
            for key, kind in AE_SETTINGS.items():
                if key in settings:
                    try:
                        setattr(params, key, kind(settings[key]))
                    except ValueError:
                        raise ModelFileError(path, f"metadata {key}={settings[key]!r} is not a number") from None
        return AutoEncoder.from_state_dict(tensors, device=device, dtype=dtype, params=params)
    except ModelFileError:
        raise
    except (*_MODEL_ERRORS, OSError) as e:
        raise ModelFileError(path, _problem(e)) from None
