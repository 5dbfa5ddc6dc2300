"""The quantization levels compared, and how each is made from the full-precision reference.

GGUF levels are `engine.convert` presets: the reference is converted once into the cache folder and loaded from
there, as a user's downloaded file would be. NF4 and FP8 have no GGUF type: their block weights are quantized in
memory with our codecs, as Forge's bitsandbytes NF4 files and ComfyUI's `fp8_e4m3fn` files store them (every other
tensor stays BF16).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from engine.checkpoints import load_checkpoint
from engine.convert import convert
from engine.loading import load_flux
from engine.memory import DENSE_FORMATS
from engine.presets import PRESETS, is_block_weight, tensor_format
from flux_model import Flux
from kernels.formats import get_format
from kernels.qtensor import QTensor
from kernels.torch_codecs.floats import STORED_DTYPES

LEVELS = ("Q8_0", "Q6_K", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_S", "Q2_K", "IQ4_XS", "NF4", "FP8")
IN_MEMORY = {"NF4": "NF4", "FP8": "F8_E4M3"}  # level -> the format of its block weights
REFERENCE = "reference"


def check_level(level: str) -> str:
    if level not in PRESETS and level not in IN_MEMORY:
        raise ValueError(f"unknown level {level!r}; known: {', '.join([*PRESETS, *IN_MEMORY])}")
    return level


def level_format(level: str, name: str, shape: tuple[int, ...]) -> str:
    """The format tensor `name` of `shape` is stored in at `level`."""
    if level in IN_MEMORY:
        return IN_MEMORY[level] if is_block_weight(name, shape) else "BF16"
    return tensor_format(name, shape, PRESETS[level])


def block_bits_per_weight(level: str) -> float:
    """Bits per weight of the level's block weights, where nearly all of Flux's bytes are (scales included)."""
    fmt = get_format(IN_MEMORY.get(level) or PRESETS[level].block)
    return 8 * fmt.block_bytes / fmt.block_size


def stored_bytes(level: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of a transformer with tensors `shapes` stored at `level` (tensors only, no file header)."""
    total = 0
    for name, shape in shapes.items():
        fmt = get_format(level_format(level, name, shape))
        total += fmt.row_bytes(shape[-1]) * (torch.Size(shape).numel() // shape[-1])
    return total


def cache_key(path: Path) -> str:
    """Names the reference in the cache: its resolved path, size and modification time (hashing a 24 GB file would
    take minutes)."""
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def stored_as(weight: torch.Tensor, fmt: str) -> torch.Tensor | QTensor:
    """`weight` as format `fmt` stores it: a cast for the plain float types, else a QTensor."""
    return weight.to(STORED_DTYPES[fmt]) if fmt in DENSE_FORMATS else QTensor.quantize(weight.float(), fmt)


def quantized_in_memory(reference: dict, level: str) -> dict:
    """The reference's state dict stored as `level` stores each tensor."""
    out = {}
    for name, t in reference.items():
        dense = t.dequantize(torch.float32) if isinstance(t, QTensor) else t
        out[name] = stored_as(dense, level_format(level, name, tuple(dense.shape)))
    return out


def level_model(reference: Path, level: str, cache: Path, dtype: torch.dtype) -> tuple[Flux, int]:
    """The transformer at `level` on the CPU and its stored bytes (the GGUF file's size, or the tensors' bytes for
    an in-memory level). GGUF files are converted into `cache` on first use."""
    if level in IN_MEMORY:
        state = quantized_in_memory(load_checkpoint(reference), level)
        nbytes = sum(t.nbytes if isinstance(t, QTensor) else t.numel() * t.element_size() for t in state.values())
        return Flux.from_state_dict(state, dtype=dtype), nbytes
    path = cache / f"{level}.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        convert(reference, path, level, workers=1, progress=False)
    return load_flux(path, dtype=dtype), os.path.getsize(path)
