"""Every tensor a module holds - parameters, buffers and quantized weights (`QTensor` attributes) - as places that
can be read and rebound. The memory planner counts bytes through it and block streaming swaps storage through it,
so both see exactly the tensors a forward pass uses, whatever the module keeps them in."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear


@dataclass(frozen=True)
class TensorPlace:
    """Where a module keeps one tensor: `owner._parameters[name]`, `owner._buffers[name]` or `owner.<name>.raw`."""

    owner: nn.Module
    kind: str  # "parameter", "buffer" or "qtensor"
    name: str

    def get(self) -> torch.Tensor:
        if self.kind == "parameter":
            return self.owner._parameters[self.name]
        if self.kind == "buffer":
            return self.owner._buffers[self.name]
        return getattr(self.owner, self.name).raw

    def set(self, tensor: torch.Tensor) -> None:
        """Rebind the place to `tensor` (same shape and dtype); the module object itself stays the same."""
        if self.kind == "parameter":
            self.owner._parameters[self.name].data = tensor  # keeps the Parameter object others may hold
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = tensor
        else:
            setattr(self.owner, self.name, dataclasses.replace(getattr(self.owner, self.name), raw=tensor))


def tensor_places(module: nn.Module) -> Iterator[TensorPlace]:
    """The places of every tensor under `module` (None entries, e.g. a Linear without bias, are skipped)."""
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                yield TensorPlace(owner, "parameter", name)
        for name, b in owner._buffers.items():
            if b is not None:
                yield TensorPlace(owner, "buffer", name)
        for name, value in vars(owner).items():
            if isinstance(value, QTensor):
                yield TensorPlace(owner, "qtensor", name)


def unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The distinct tensors under `module` (one tensor reachable from two places, e.g. a quantized weight's bytes
    registered as a buffer and held by its QTensor, is listed once)."""
    seen: dict[int, torch.Tensor] = {}
    for place in tensor_places(module):
        tensor = place.get()
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def device_nbytes(module: nn.Module, skip: frozenset[int] | set[int] = frozenset()) -> int:
    """Bytes `module`'s tensors take on a GPU, where quantized weights are repacked into the layout the kernels read
    (`QTensor.kernel_nbytes`); each tensor once, those whose id is in `skip` left out."""
    seen: dict[int, int] = {}
    for place in tensor_places(module):
        tensor = place.get()
        if id(tensor) not in skip:
            weight = _quantized_weight(place)
            seen[id(tensor)] = tensor.numel() * tensor.element_size() if weight is None else weight.kernel_nbytes
    return sum(seen.values())


def _quantized_weight(place: TensorPlace) -> QTensor | None:
    """The QTensor whose bytes live at `place`: a QTensor attribute, or a QuantLinear's `raw` buffer."""
    if place.kind == "qtensor":
        return getattr(place.owner, place.name)
    if place.kind == "buffer" and place.name == "raw" and isinstance(place.owner, QuantLinear):
        return place.owner.weight
    return None


def tensor_nbytes(module: nn.Module) -> int:
    """Bytes of every tensor `module` holds (meta tensors count as the bytes they describe)."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(module))
