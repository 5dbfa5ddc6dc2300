"""What a LoRA file holds once read: low-rank updates of the transformer's Linears, under BFL's module names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.quant_linear import QuantLinear


@dataclass(frozen=True)
class LoRAUpdate:
    """ΔW[rows] = scale · up @ down for one Linear of the transformer: `down` (rank, in_features), `up` (rows, rank).
    The rows start at `row_start`: a q, k, v or MLP-input slice of a fused weight (`img_attn.qkv`, `linear1`), or
    the whole weight. `scale` is the file's own (alpha / rank), before the weight a user gives the LoRA."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    row_start: int = 0

    @property
    def row_stop(self) -> int:
        return self.row_start + self.up.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense float32 (rows, in_features) update: the slow, obvious form of what `LoRALinear` adds."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass(frozen=True)
class LoRA:
    """One LoRA file: `name` (the file's stem), the layout it was written in ("diffusers", "kohya", "xlabs",
    "bfl"), and its updates."""

    name: str
    path: str
    format: str
    updates: tuple[LoRAUpdate, ...]

    @property
    def modules(self) -> list[str]:
        return sorted({u.module for u in self.updates})


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear))
