"""`load_checkpoint(path)`: any Flux transformer file users have, as BFL-named tensors and `QTensor`s.

Reads GGUF (city96's files and ours), safetensors in BFL, ComfyUI (prefixed), diffusers (split q/k/v, sharded),
FP8 e4m3fn (optionally with per-tensor scales) and Forge bitsandbytes NF4 layouts. Quantized weights stay in their
format (memory-mapped, not decoded). Every problem with a file raises `engine.ModelFileError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoints.gguf_file import MAGIC as GGUF_MAGIC, read_gguf
from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError
from flux_model.model import infer_flux_config  # next to the model it describes; re-exported for file checks
from kernels.qtensor import QTensor

__all__ = ["load_checkpoint", "infer_flux_config"]

# Prefixes under which ComfyUI and stable-diffusion.cpp files store the transformer (longest first).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
FLUX_MARKER = "double_blocks.0.img_attn.qkv.weight"
LOOKALIKES = {  # a name typical of another kind of model -> what it is
    "blk.0.attn_q.weight": "a language model GGUF",
    "model.layers.0.self_attn.q_proj.weight": "a language model",
    "input_blocks.0.0.weight": "a UNet (SD 1.x / SDXL) checkpoint",
    "model.diffusion_model.input_blocks.0.0.weight": "a UNet (SD 1.x / SDXL) checkpoint",
    "decoder.conv_in.weight": "a VAE",
    "encoder.block.0.layer.0.SelfAttention.q.weight": "a T5 text encoder",
    "text_model.encoder.layers.0.self_attn.q_proj.weight": "a CLIP text encoder",
}

Checkpoint = dict[str, "torch.Tensor | QTensor"]


def _strip_prefix(tensors: Checkpoint) -> Checkpoint:
    """Keep the transformer's tensors under BFL names, dropping a ComfyUI-style prefix and, in all-in-one files,
    the VAE and text encoders stored beside it."""
    for prefix in PREFIXES:
        stripped = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if any(name.startswith("double_blocks.") for name in stripped):
            return stripped
    return tensors


def what_it_looks_like(names, lookalikes: dict[str, str] = LOOKALIKES) -> str:
    """"; it looks like <kind>" from a tensor name typical of another kind of file, else the first few names: the
    tail of an error message about a file that is not what was expected."""
    for marker, kind in lookalikes.items():
        if marker in names:
            return f"; it looks like {kind}"
    sample = ", ".join(sorted(names)[:3])
    return f"; first tensors: {sample}" if sample else "; it holds no tensors"


def _read_file(path: Path) -> Checkpoint:
    with open(path, "rb") as f:
        head = f.read(9)
    magic = head[:4]
    is_safetensors = head[8:9] == b"{"  # a u64 header length, then the JSON header
    # the GGUF reader also takes .gguf files without the magic (empty, truncated, junk): its errors name GGUF
    if magic == GGUF_MAGIC or (path.suffix.lower() == ".gguf" and not is_safetensors):
        tensors, metadata = read_gguf(path)
        arch = metadata.get("general.architecture")
        if arch is not None and arch != "flux":
            raise ModelFileError(path, f"GGUF architecture {arch!r} is not a Flux transformer")
        return tensors
    is_pickle = magic.startswith(b"PK\x03\x04") or (magic[:1] == b"\x80" and magic[1:2] in b"\x02\x03\x04\x05")
    if path.suffix in PICKLE_SUFFIXES or (is_pickle and not is_safetensors):
        raise ModelFileError(path, "pickle-based checkpoint (.ckpt/.pt/.bin): loading one can run arbitrary code, "
                                   "so it is refused; use a .safetensors or .gguf file")
    return read_safetensors(path)[0]


def load_checkpoint(path) -> Checkpoint:
    """BFL name -> tensor (F32/F16/BF16) or `QTensor`, for a file, a sharded index json or a diffusers folder."""
    from engine.checkpoints import diffusers, forge_nf4, fp8

    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    try:
        if path.is_dir() or path.name.endswith(".index.json"):
            tensors = diffusers.read_folder(path)
        else:
            tensors = _read_file(path)
        tensors = fp8.apply_scales(forge_nf4.to_qtensors(tensors, path), path)
        if diffusers.is_diffusers(tensors):
            tensors = diffusers.to_bfl(tensors, path)
        tensors = _strip_prefix(tensors)
        if FLUX_MARKER not in tensors:
            raise ModelFileError(path, f"not a Flux transformer (no {FLUX_MARKER}){what_it_looks_like(tensors)}")
        infer_flux_config(tensors)
    except ModelFileError:
        raise
    except (ValueError, OSError, KeyError, IndexError, TypeError, OverflowError, RuntimeError) as e:
        raise ModelFileError(path, f"{type(e).__name__}: {e}") from None
    return tensors
