"""Everything the kernels keep between calls, per device, in one place.

- scratch buffers: where the "dequantize into scratch + torch matmul" method decodes a weight; one per (device,
  dtype), grown to the largest weight seen (or sized ahead with `reserve_scratch`);
- constant tables on each device: the code-book tables of `kernels.formats` (`table`) and tables a codec derives
  from them (`constants`), built once per device instead of copied per call;
- device properties (name, multiprocessor count), which cost a driver call to look up.

`held_bytes()` says how much memory that is and `release()` frees it (all devices or one); the next call that needs
something rebuilds it. Devices are keyed with their index (`cuda` means the current one at the time of the call),
and `on_device` makes a tensor's GPU the current one around a launch: Triton launches on the current device, so
without it a weight on the second GPU would be read by a kernel started on the first.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from kernels import formats

# name -> the values `table(name, device)` holds, as float32
TABLES = {"nf4": formats.NF4_VALUES, "iq4": formats.IQ4_VALUES}

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_constants: dict[tuple[str, torch.device], object] = {}


def device_key(device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device, so two GPUs never share an entry."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def common_device(*tensors) -> torch.device:
    """The one device all the given tensors (None entries skipped) are on; ValueError when they are on several (a
    kernel launched on one GPU cannot read another's memory)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"tensors must be on one device, got {', '.join(sorted(map(str, devices))) or 'none'}")
    return devices.pop()


def on_device(device) -> contextlib.AbstractContextManager:
    """Context in which `device` is the current CUDA device (nothing to do for other devices)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- scratch

def scratch(numel: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D `(numel,)` tensor of `dtype` on `device` to write into; the same memory on every call (contents are
    whatever the last user left), grown when a call needs more."""
    key = (device_key(device), dtype)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < numel:
        _scratch.pop(key, None)  # free the old buffer before allocating the larger one
        buffer = _scratch[key] = torch.empty(numel, dtype=dtype, device=key[0])
    return buffer[:numel]


def reserve_scratch(numel: int, device, dtype: torch.dtype) -> None:
    """Size the scratch buffer for `(device, dtype)` to at least `numel` elements now (e.g. the largest weight of a
    model, N * K), so that no call allocates mid-run."""
    scratch(numel, device, dtype)


# ---------------------------------------------------------------------------------------------------- tables

def constants(name: str, device, build: Callable[[torch.device], object]):
    """`build(device)` (a tensor, or a dict / tuple of tensors), computed once per (name, device)."""
    key = (name, device_key(device))
    if key not in _constants:
        _constants[key] = build(key[1])
    return _constants[key]


def table(name: str, device) -> torch.Tensor:
    """The float32 table `TABLES[name]` on `device` (NF4 values, IQ4 values)."""
    return constants(f"table:{name}", device,
                     lambda d: torch.tensor(TABLES[name], dtype=torch.float32, device=d))


# ---------------------------------------------------------------------------------------------------- properties

@functools.lru_cache(maxsize=None)
def _properties(device: torch.device):
    return torch.cuda.get_device_properties(device)


def device_name(device) -> str:
    """The CUDA device's name ("NVIDIA H100 80GB HBM3"), looked up once."""
    return _properties(device_key(device)).name


def compute_capability(device) -> int:
    """The CUDA device's compute capability as one number (9.0 -> 90), looked up once."""
    properties = _properties(device_key(device))
    return 10 * properties.major + properties.minor


def multiprocessor_count(device) -> int:
    """The CUDA device's number of SMs, looked up once."""
    return _properties(device_key(device)).multi_processor_count


# ---------------------------------------------------------------------------------------------------- accounting

def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _matches(key_device: torch.device, device) -> bool:
    return device is None or key_device == device_key(device)


def held_bytes(device=None) -> int:
    """Bytes of scratch buffers and tables held on `device` (default: on every device)."""
    total = sum(t.nbytes for (d, _), t in _scratch.items() if _matches(d, device))
    return total + sum(t.nbytes for (_, d), value in _constants.items() if _matches(d, device)
                       for t in _tensors(value))


def release(device=None) -> None:
    """Drop the scratch buffers and tables of `device` (default: of every device); they are rebuilt on demand.
    (The CUDA caching allocator keeps the freed blocks for reuse until `torch.cuda.empty_cache()`.)"""
    for key in [k for k in _scratch if _matches(k[0], device)]:
        del _scratch[key]
    for key in [k for k in _constants if _matches(k[1], device)]:
        del _constants[key]
