"""Merge mode: LoRAs baked into the weights once, stored again in the weight's own format.

Zero cost per step, but a slower load (every touched Linear is decoded, updated and re-encoded on the CPU) and lossy
on quantized weights: the merged weight carries a fresh rounding error of its format, on every weight of the Linear,
on top of the one the file already had. Runtime mode (`LoRALinear`) adds the LoRAs exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.convert import encode
from engine.lora.updates import LoRAUpdate
from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear


def merged_weight(module: nn.Module, updates: list[tuple[LoRAUpdate, float]]) -> torch.Tensor:
    """`module`'s weight in float32 on the CPU with Σ weight · ΔW added to its rows."""
    weight = module.weight
    if isinstance(weight, QTensor):
        # a copy: for a plain float format dequantize returns a view of the stored bytes, which += would change
        weight = weight.to("cpu").dequantize().clone()
    else:
        weight = weight.detach().to("cpu", torch.float32, copy=True)
    for update, strength in updates:
        weight[update.row_start:update.row_stop] += strength * update.delta()
    return weight


def merged_linear(name: str, module: nn.Module, updates: list[tuple[LoRAUpdate, float]]) -> nn.Module:
    """A new Linear like `module` (nn.Linear or QuantLinear, same storage format and layout), on the CPU, whose
    weight has the updates (each with its LoRA's weight) baked in. A quantized weight is requantized with the
    converter's encoder; a scaled FP8 weight keeps its per-tensor scale."""
    weight = merged_weight(module, updates)
    bias = None if module.bias is None else module.bias.detach().to("cpu")
    if isinstance(module, QuantLinear):
        stored = module.weight
        source = weight if stored.scale is None else weight / stored.scale
        (_, raw), = encode([(name, source, stored.format)])
        merged = QuantLinear(QTensor(torch.from_numpy(raw), stored.format, stored.shape, stored.scale), bias)
        return merged.to_planes_() if stored.layout == "planes" else merged
    merged = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    merged.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)
    if bias is not None:
        merged.bias = nn.Parameter(bias, requires_grad=False)
    return merged
