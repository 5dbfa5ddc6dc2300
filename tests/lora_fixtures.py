"""Random LoRA files for tiny Flux models, in the layouts LoRAs ship in, written with no code of the engine: diffusers'
own BFL -> diffusers converter says where each diffusers Linear's rows live in BFL's fused weights."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from tests.flux_fixtures import diffusers_state_dict, flux_shapes


def random_factors(out_features: int, in_features: int, rank: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (rank, in), up (out, rank)) whose product is a clearly visible update of a 1/sqrt(in) weight."""
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) * 0.3 / rank**0.5
    return down, up


def peft_lora(transformer: nn.Module, rank: int, alpha: float | None, seed: int) -> dict[str, torch.Tensor]:
    """diffusers / PEFT keys for every Linear of a diffusers FluxTransformer2DModel: `transformer.<name>.lora_A.weight`,
    `.lora_B.weight` and, when `alpha` is given, `.alpha`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear):
            down, up = random_factors(module.out_features, module.in_features, rank, generator)
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
            if alpha is not None:
                tensors[f"transformer.{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


def diffusers_rows(hidden: int, heads: int, depth: int, depth_single: int, guidance: bool) -> dict[str, tuple]:
    """diffusers Linear name -> (BFL Linear name, the BFL rows its output rows are, in order), read off diffusers'
    converter run on weights whose entries are (Linear number, row)."""
    shapes = flux_shapes(hidden=hidden, heads=heads, depth=depth, depth_single=depth_single, guidance=guidance)
    linears = sorted(name[:-len(".weight")] for name, shape in shapes.items()
                     if name.endswith(".weight") and len(shape) == 2)
    probe = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        code = float(linears.index(module) * 1000) if module in linears else 0.0
        rows = torch.arange(shape[0], dtype=torch.float32)[:, None] if len(shape) == 2 else torch.zeros(shape)
        probe[name] = (code + rows).expand(shape).clone() if len(shape) == 2 else rows
    converted = diffusers_state_dict(probe, hidden, int(hidden * 4))
    found = {}
    for name, weight in converted.items():
        if name.endswith(".weight") and weight.dim() == 2:
            codes = weight[:, 0].long()
            found[name[:-len(".weight")]] = (linears[int(codes[0]) // 1000], (codes % 1000).tolist())
    return found


def kohya_from_peft(peft: dict[str, torch.Tensor], rows: dict[str, tuple], out_features: dict[str, int],
                    alpha_factor: float = 2.0) -> dict[str, torch.Tensor]:
    """The same updates in kohya's layout on BFL names: for a fused weight, the parts' down-projections stacked and
    their up-projections as a block-diagonal matrix on their rows. Each part's scale (alpha / rank) is folded into its
    up block, and the file's alpha is `alpha_factor` x the stacked rank (its scale divided out of the blocks)."""
    parts: dict[str, list] = {}
    for key, down in peft.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("transformer."):-len(".lora_A.weight")]
        up = peft[f"transformer.{module}.lora_B.weight"]
        alpha = peft.get(f"transformer.{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        bfl, bfl_rows = rows[module]
        parts.setdefault(bfl, []).append((down, up * scale, bfl_rows))
    tensors = {}
    for bfl, pieces in parts.items():
        rank = sum(down.shape[0] for down, _, _ in pieces)
        up = torch.zeros(out_features[bfl], rank)
        column = 0
        for down, scaled_up, bfl_rows in pieces:
            up[torch.tensor(bfl_rows), column:column + down.shape[0]] = scaled_up / alpha_factor
            column += down.shape[0]
        key = "lora_unet_" + bfl.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.cat([down for down, _, _ in pieces])
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha_factor * rank)
    return tensors


def write(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
