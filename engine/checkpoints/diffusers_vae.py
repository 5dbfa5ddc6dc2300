"""A diffusers `vae/` folder (AutoencoderKL: `config.json` + `diffusion_pytorch_model.safetensors`) under BFL's names.

The inverse of diffusers' `convert_ldm_vae_checkpoint`: resnets, down/up samplers and the mid block are renamed, the
mid attention's Linear weights become BFL's 1x1 convolutions, and the decoder's up blocks are numbered the other way
round (diffusers' up_blocks.0 is BFL's lowest resolution, up.{n-1}). `config.json` gives the latent scale, shift and
GroupNorm group count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError

WEIGHTS = "diffusion_pytorch_model.safetensors"
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "conv_shortcut": "nin_shortcut"}
ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _bfl_name(name: str, up_blocks: int) -> str:
    side, _, rest = name.partition(".")
    rules = [
        (r"conv_norm_out\.(.+)", lambda m: f"norm_out.{m[1]}"),
        (r"(conv_in|conv_out)\.(.+)", lambda m: f"{m[1]}.{m[2]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"down.{m[1]}.block.{m[2]}.{RESNET_PARTS[m[3]]}.{m[4]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m: f"down.{m[1]}.downsample.conv.{m[2]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda m: f"up.{up_blocks - 1 - int(m[1])}.block.{m[2]}.{RESNET_PARTS[m[3]]}.{m[4]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"up.{up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"mid_block\.resnets\.(\d)\.(\w+)\.(.+)", lambda m: f"mid.block_{int(m[1]) + 1}.{RESNET_PARTS[m[2]]}.{m[3]}"),
        (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
         lambda m: f"mid.attn_1.{ATTENTION_PARTS[m[1]]}.{m[2]}"),
    ]
    for pattern, rename in rules:
        if m := re.fullmatch(pattern, rest):
            return f"{side}.{rename(m)}"
    raise KeyError(name)


def read_vae_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """BFL-named tensors and {scale_factor, shift_factor, norm_groups} from the folder's config."""
    weights, config_file = path / WEIGHTS, path / "config.json"
    if not weights.is_file() or not config_file.is_file():
        raise ModelFileError(path, f"not a diffusers VAE folder: needs {WEIGHTS} and config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(config_file, f"unreadable config: {e}") from None
    tensors, _ = read_safetensors(weights)
    up_blocks = len(config.get("up_block_types", ()))
    converted, unknown = {}, []
    for name, t in tensors.items():
        try:
            bfl = _bfl_name(name, up_blocks)
        except KeyError:
            unknown.append(name)
            continue
        if ".attn_1." in bfl and bfl.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # diffusers' attention Linears are BFL's 1x1 convolutions
        converted[bfl] = t
    if unknown:
        raise ModelFileError(weights, f"{len(unknown)} tensors that a FLUX-style VAE does not have, e.g. "
                                      f"{unknown[:3]} (quant_conv layers are not supported)")
    settings = {"scale_factor": config.get("scaling_factor"), "shift_factor": config.get("shift_factor"),
                "norm_groups": config.get("norm_num_groups")}
    return converted, {k: v for k, v in settings.items() if v is not None}
