"""Models from files: `load_flux(path)` and `load_ae(path)`.

`flux_model` holds the math and builds models from state dicts (`Flux.from_state_dict`, `AutoEncoder.from_state_dict`,
ValueError on a mismatch); reading files, and naming the file in every error, happens here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoints import load_checkpoint
from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError
from flux_model import AutoEncoder, AutoEncoderParams, Flux
from flux_model.autoencoder import infer_params

# Full checkpoints (LDM, ComfyUI) store the VAE under one of these prefixes.
AE_PREFIXES = ("first_stage_model.", "vae.")
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
    stripped). `params` defaults to the architecture read off the tensor shapes, with FLUX's scale/shift and the
    GroupNorm group count of the file's metadata key "norm_groups" (default 32). Any problem raises ModelFileError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such file")
    try:
        tensors, metadata = read_safetensors(path)
        for prefix in AE_PREFIXES:
            if tensors and all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        if params is None:
            params = infer_params(tensors)
            try:
                params.norm_groups = int(metadata.get("norm_groups", params.norm_groups))
            except ValueError:
                raise ModelFileError(path, f"metadata norm_groups={metadata['norm_groups']!r} is not an "
                                           f"integer") from None
        return AutoEncoder.from_state_dict(tensors, device=device, dtype=dtype, params=params)
    except ModelFileError:
        raise
    except (*_MODEL_ERRORS, OSError) as e:
        raise ModelFileError(path, _problem(e)) from None
