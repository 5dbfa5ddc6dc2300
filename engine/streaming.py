"""Block streaming: transformer blocks that do not fit on the GPU live in pinned CPU memory and are copied in just
before they run, the next one's copy overlapping the current one's compute.

Two staging slots on the device, each as large as the largest streamed block, take turns: when streamed block k
starts, it waits for its copy (an event recorded on the copy stream), and the next streamed block's copy is queued on
the copy stream into the other slot, after waiting for the last compute that read that slot (another event). After a
block runs its tensors point back at their CPU copies, so the module holds no device memory of its own; the slots are
the only extra VRAM (`MemoryPlan`'s "staging slots"). On a CPU device the same copies run synchronously, which is how
the logic is tested without a GPU.

Only the tensors a forward with precomputed modulations uses are streamed: a block's adaLN Linear (offloaded by
`Flux.offload_modulation_weights`) is left where it is.

On CUDA, quantized weights take the planes layout the kernels read fastest (`kernels.repack`, same bytes regrouped):
resident ones on the GPU after they arrive, streamed ones in CPU memory just before they are pinned. Their files
stay memory-mapped until then.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from engine.module_tensors import TensorPlace, tensor_places, unique_tensors
from kernels.quant_linear import QuantLinear

ALIGNMENT = 256  # byte alignment of each tensor inside a slot (what CUDA's allocator gives a tensor of its own)


@dataclass
class _Tensor:
    places: list[TensorPlace]  # every place that holds this tensor (a QTensor's bytes may also be a buffer)
    home: torch.Tensor  # the CPU copy (pinned when streaming to CUDA)
    offset: int  # byte offset inside a slot


@dataclass
class _Block:
    module: nn.Module
    tensors: list[_Tensor]
    nbytes: int  # slot bytes it takes, alignment included


class _Slot:
    def __init__(self, nbytes: int, device: torch.device):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.block: int | None = None  # index of the streamed block the buffer holds or is receiving
        cuda = device.type == "cuda"
        self.copied = torch.cuda.Event() if cuda else None  # its copy is complete
        self.read = torch.cuda.Event() if cuda else None  # the last block that ran from it is done

    def view(self, t: _Tensor) -> torch.Tensor:
        nbytes = t.home.numel() * t.home.element_size()
        return self.buffer[t.offset:t.offset + nbytes].view(t.home.dtype).view(t.home.shape)


class BlockStreamer:
    """Streams `blocks` (in execution order) to `device`; `remove()` stops it, leaving them in CPU memory."""

    def __init__(self, blocks: list[nn.Module], device, skip: Iterable[torch.Tensor] = ()):
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        skip_ids = {id(t) for t in skip}
        self._blocks = [self._prepare(block, skip_ids, pin) for block in blocks]
        slot_bytes = max((b.nbytes for b in self._blocks), default=0)
        self._slots = [_Slot(slot_bytes, self.device) for _ in range(min(2, len(self._blocks)))]
        self._copy_stream = torch.cuda.Stream(self.device) if pin else None
        self._hooks = []
        for i, block in enumerate(self._blocks):
            self._hooks.append(block.module.register_forward_pre_hook(lambda *_, i=i: self._before(i)))
            self._hooks.append(block.module.register_forward_hook(lambda *_, i=i: self._after(i)))

    @property
    def slot_bytes(self) -> int:
        return sum(slot.buffer.numel() for slot in self._slots)

    @staticmethod
    def _prepare(module: nn.Module, skip_ids: set[int], pin: bool) -> _Block:
        by_tensor: dict[int, list[TensorPlace]] = {}
        for place in tensor_places(module):
            if id(place.get()) not in skip_ids:
                by_tensor.setdefault(id(place.get()), []).append(place)
        tensors, offset = [], 0
        for places in by_tensor.values():
            home = places[0].get().detach().to("cpu").contiguous()
            home = home.pin_memory() if pin else home
            for place in places:
                place.set(home)
            tensors.append(_Tensor(places, home, offset))
            offset += -(-home.numel() * home.element_size() // ALIGNMENT) * ALIGNMENT
        return _Block(module, tensors, offset)

    def _load(self, i: int, slot: _Slot) -> None:
        """Copy block i into `slot` (queued on the copy stream on CUDA, once the slot's last reader is done)."""
        slot.block = i
        if self._copy_stream is None:
            for t in self._blocks[i].tensors:
                slot.view(t).copy_(t.home)
            return
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(slot.read)
            for t in self._blocks[i].tensors:
                slot.view(t).copy_(t.home, non_blocking=True)
            slot.copied.record(self._copy_stream)

    def _before(self, i: int) -> None:
        slot = next((s for s in self._slots if s.block == i), None)
        if slot is None:  # not prefetched (the first call, or a forward that skipped blocks)
            slot = next((s for s in self._slots if s.block is None), self._slots[0])
            self._load(i, slot)
        if slot.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.copied)
        for t in self._blocks[i].tensors:
            view = slot.view(t)
            for place in t.places:
                place.set(view)
        following = (i + 1) % len(self._blocks)  # after the last block comes the next step's first
        if all(s.block != following for s in self._slots):
            self._load(following, next(s for s in self._slots if s is not slot))

    def _after(self, i: int) -> None:
        slot = next(s for s in self._slots if s.block == i)
        if slot.read is not None:
            slot.read.record(torch.cuda.current_stream(self.device))
        for t in self._blocks[i].tensors:
            for place in t.places:
                place.set(t.home)

    def remove(self) -> None:
        """Stop streaming: hooks and slots go; the blocks stay in (pinned) CPU memory."""
        if self._copy_stream is not None:
            torch.cuda.synchronize(self.device)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._slots = [], []


def _blocks_by_name(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The named blocks in execution order (double blocks, then single blocks, each by index)."""
    wanted = set(names)
    order = [f"double_blocks.{i}" for i in range(len(model.double_blocks))]
    order += [f"single_blocks.{i}" for i in range(len(model.single_blocks))]
    unknown = wanted - set(order)
    if unknown:
        raise ValueError(f"no such blocks: {', '.join(sorted(unknown))}")
    return [model.get_submodule(name) for name in order if name in wanted]


def to_kernel_layout(modules: Iterable[nn.Module], skip: Iterable[torch.Tensor] = ()) -> None:
    """Every QuantLinear under `modules` (except those holding a `skip` tensor) into the planes layout, where its
    bytes are."""
    skip_ids = {id(t) for t in skip}
    for module in modules:
        for linear in module.modules():
            if isinstance(linear, QuantLinear) and id(linear.raw) not in skip_ids:
                linear.to_planes_()


def stream_blocks(model: nn.Module, streamed: Iterable[str], device) -> BlockStreamer:
    """Stream the Flux blocks named in `streamed` ("double_blocks.3", "single_blocks.17", ...) to `device` at each
    forward; their tensors move to CPU memory now (pinned for CUDA). Everything else is left where it is."""
    skip = unique_tensors(nn.ModuleList(model.vec_modules()))
    blocks = _blocks_by_name(model, streamed)
    if torch.device(device).type == "cuda":
        to_kernel_layout(blocks, skip)
    return BlockStreamer(blocks, device, skip)


def streamed_block_names(plan) -> list[str]:
    return ([f"double_blocks.{i}" for i in plan.streamed_double]
            + [f"single_blocks.{i}" for i in plan.streamed_single])


def apply_plan(model: nn.Module, plan, device) -> BlockStreamer:
    """Place a Flux as `plan` (a MemoryPlan) says: streamed blocks in CPU memory behind a BlockStreamer (returned;
    it streams nothing when the plan keeps everything resident), every other tensor except the modulation weights
    (left where `offload_modulation_weights` put them) on `device`."""
    names = streamed_block_names(plan)
    vec_ids = {id(t) for t in unique_tensors(nn.ModuleList(model.vec_modules()))}
    streamed_ids = {id(t) for block in _blocks_by_name(model, names) for t in unique_tensors(block)}
    moved: dict[int, torch.Tensor] = {}
    for place in tensor_places(model):
        tensor = place.get()
        if id(tensor) in vec_ids or id(tensor) in streamed_ids:
            continue
        if id(tensor) not in moved:
            moved[id(tensor)] = tensor.detach().to(device)
        place.set(moved[id(tensor)])
    if torch.device(device).type == "cuda":
        resident = [m for m in model.modules() if isinstance(m, QuantLinear) and m.raw.is_cuda]
        to_kernel_layout(resident)
    return stream_blocks(model, names, device)
