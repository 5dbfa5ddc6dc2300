"""Running an encoder whose weights live in CPU memory on a CUDA device, one transformer block at a time.

The model is cut into units: the small remainder (final norm, CLIP's position embedding; the token embedding is not
moved at all, `QuantEmbedding` gathers its rows on the CPU) and each block. Forward hooks on the blocks swap a unit's
weights for device copies just before it runs and back to the CPU originals just after: while block i computes on
the current stream, block i+1 is copied on a second stream from pinned memory, and block i's compute waits on that
copy's event only when it reaches block i+1. So about two blocks are on the device at once, and nothing is left
there afterwards. Device copies are marked as used by the compute stream (`record_stream`), so the allocator does
not hand their memory to the next copy before the kernels reading them are done.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import nn

from engine.text_encoders.models import QuantEmbedding


@dataclasses.dataclass(frozen=True)
class Slot:
    """One weight of a module: a parameter or a buffer (a `QuantLinear`'s quantized bytes are its buffer `raw`)."""

    owner: nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str

    def get(self):
        return getattr(self.owner, self.table)[self.name]

    def set(self, value) -> None:
        getattr(self.owner, self.table)[self.name] = value


def _slots(modules) -> list[Slot]:
    slots = []
    for module in modules:
        if isinstance(module, QuantEmbedding):
            continue
        for table in ("_parameters", "_buffers"):
            slots += [Slot(module, table, name) for name, t in getattr(module, table).items() if t is not None]
    return slots


def _map(value, fn):
    """`fn` applied to the storage of a parameter or buffer, keeping its kind."""
    if isinstance(value, nn.Parameter):
        return nn.Parameter(fn(value.data), requires_grad=False)
    return fn(value)


def _storage(value) -> torch.Tensor:
    return value.data if isinstance(value, nn.Parameter) else value


class BlockStreamer:
    """Places a CPU-resident model's weights on a device: streamed block by block, or all of them (resident)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList):
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        self.blocks = list(blocks)
        self.units = [_slots(m for m in model.modules() if id(m) not in in_blocks)]
        self.units += [_slots(block.modules()) for block in self.blocks]
        self.pinned = False

    def _home(self) -> list[list]:
        return [[slot.get() for slot in unit] for unit in self.units]

    def _assign(self, unit: int, values) -> None:
        for slot, value in zip(self.units[unit], values):
            slot.set(value)

    def pin(self) -> None:
        """Copy every weight once into page-locked memory, from which copies to the GPU run asynchronously. This is
        where the weights become RAM-resident (a memory-mapped file is read in full); where pinning is refused
        (e.g. limited locked memory) they stay pageable and copies are synchronous."""
        if self.pinned:
            return
        try:
            for unit, values in enumerate(self._home()):
                self._assign(unit, [_map(v, torch.Tensor.pin_memory) for v in values])
        except RuntimeError:
            pass
        self.pinned = True

    @contextmanager
    def resident(self, device: torch.device):
        """Every weight on `device` for the duration (the baseline streaming is measured against)."""
        home = self._home()
        try:
            for unit, values in enumerate(home):
                self._assign(unit, [_map(v, lambda t: t.to(device)) for v in values])
            yield
        finally:
            for unit, values in enumerate(home):
                self._assign(unit, values)

    @contextmanager
    def streamed(self, device: torch.device):
        """Within this context a forward pass streams the blocks through `device` (a CUDA device)."""
        self.pin()
        home = self._home()
        compute = torch.cuda.current_stream(device)
        copier = torch.cuda.Stream(device)
        copies: dict[int, tuple[list, torch.cuda.Event]] = {}

        def prefetch(unit: int) -> None:
            with torch.cuda.stream(copier):
                values = [_map(v, lambda t: t.to(device, non_blocking=True)) for v in home[unit]]
                copies[unit] = values, copier.record_event()

        def enter(unit: int) -> None:
            values, ready = copies.pop(unit)
            compute.wait_event(ready)
            for v in values:
                _storage(v).record_stream(compute)
            self._assign(unit, values)
            if unit + 1 < len(self.units):
                prefetch(unit + 1)

        hooks = []
        for i, block in enumerate(self.blocks, start=1):
            hooks.append(block.register_forward_pre_hook(lambda module, args, unit=i: enter(unit)))
            hooks.append(block.register_forward_hook(
                lambda module, args, output, unit=i: self._assign(unit, home[unit])))
        try:
            prefetch(0)
            enter(0)
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for unit, values in enumerate(home):
                self._assign(unit, values)
            copies.clear()
