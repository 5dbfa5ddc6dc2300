"""`LoRALinear`: a Linear, left in its stored format, plus the low-rank terms of the active LoRAs added at each call.

No weight is ever dequantized to apply a LoRA: the base Linear runs as it would (Triton kernels on a quantized
weight), and `scale · (x Aᵀ) Bᵀ` is added for every LoRA, batched: the down-projections of all LoRAs, their scales
folded in, are stacked into one matrix (one matmul), and the up-projections onto each output-row range (the q, k, v or
MLP slice of a fused weight, or all rows) are one matmul each, accumulated into the base output in place.
"""

from __future__ import annotations

from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from engine.lora.updates import LoRAUpdate, is_linear


def module_device(module: nn.Module) -> torch.device:
    return next(chain(module.parameters(), module.buffers())).device  # a QuantLinear's bytes are a buffer


class LoRALinear(nn.Module):
    """`base` (an nn.Linear or QuantLinear, not modified) plus `updates`, each from LoRA number `source` of a stack.

    Buffers (so `.to()`, block streaming and the memory planner see them): `down` (all ranks, in_features), each
    update's down-projection times its file scale and its LoRA's weight, and `up0`, `up1`, ... one per output-row
    range, holding the up-projections of every update that lands there side by side."""

    def __init__(self, base: nn.Module, updates: list[tuple[LoRAUpdate, int]], weights: list[float],
                 dtype: torch.dtype):
        super().__init__()
        if not is_linear(base) or not updates:
            raise ValueError("LoRALinear wraps an nn.Linear or QuantLinear with at least one update")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = module_device(base)
        by_rows: dict[tuple[int, int], list[tuple[LoRAUpdate, int]]] = {}
        for update, source in updates:
            by_rows.setdefault((update.row_start, update.row_stop), []).append((update, source))
        self._updates = [item for rows in sorted(by_rows) for item in by_rows[rows]]  # in `down`'s row order
        self.register_buffer("down", self._scaled_down(weights).to(device, dtype))
        self._segments = []  # (buffer, first row, row after the last, first column, column after the last)
        column = 0
        for i, (rows, group) in enumerate(sorted(by_rows.items())):
            up = torch.cat([u.up for u, _ in group], dim=1)
            self.register_buffer(f"up{i}", up.to(device, dtype))
            self._segments.append((f"up{i}", *rows, column, column + up.shape[1]))
            column += up.shape[1]

    def _scaled_down(self, weights: list[float]) -> torch.Tensor:
        return torch.cat([update.down * (update.scale * weights[source]) for update, source in self._updates])

    def set_weights(self, weights: list[float]) -> None:
        """Weight of LoRA number i of the stack: weights[i] (0 turns it off, negative inverts it)."""
        self.down.copy_(self._scaled_down(weights))

    @property
    def lora_nbytes(self) -> int:
        """Bytes of the LoRA buffers (the base's not included)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not y.is_contiguous():
            y = y.contiguous()
        down = self.down if self.down.dtype == x.dtype else self.down.to(x.dtype)
        h = F.linear(x, down).reshape(-1, down.shape[0])
        y2d = y.view(-1, self.out_features)
        for name, r0, r1, c0, c1 in self._segments:
            up = self._buffers[name]
            up = up if up.dtype == y.dtype else up.to(y.dtype)
            target = y2d if (r0, r1) == (0, self.out_features) else y2d[:, r0:r1]
            target.addmm_(h[:, c0:c1], up.t())
        return y

    def extra_repr(self) -> str:
        ranks = ", ".join(f"rows {r0}:{r1} rank {c1 - c0}" for _, r0, r1, c0, c1 in self._segments)
        return f"LoRA {ranks}"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear (nn.Linear or QuantLinear) of `model` by name; a LoRALinear counts as the Linear it wraps."""
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[name] = module.base
        elif is_linear(module) and id(module) not in wrapped:
            found[name] = module
    return found
