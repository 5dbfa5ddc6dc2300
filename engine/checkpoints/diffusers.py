"""diffusers-format Flux transformers: sharded folders (`transformer/config.json`, `*.safetensors.index.json` and
its shards) or single files named like `FluxTransformer2DModel`, converted to BFL's names.

The mapping is the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
(`diffusers/loaders/single_file_utils.py`): diffusers splits BFL's fused q/k/v (and, in single blocks, q/k/v/mlp)
projections into separate Linears, and stores the final AdaLayerNormContinuous projection with its halves in
(scale, shift) order where BFL's `final_layer.adaLN_modulation.1` has (shift, scale). Everything but the
concatenations and that half swap stays a view of the file's memory map.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError
from kernels.qtensor import QTensor

__all__ = ["read_folder", "is_diffusers", "to_bfl", "bfl_name", "swap_halves", "SWAPPED"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Prefixes under which a diffusers transformer may be stored (a pipeline's single file, ComfyUI), longest first.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "")
MARKERS = ("x_embedder.weight", "transformer_blocks.0.attn.to_q.weight", "context_embedder.weight",
           "single_transformer_blocks.0.attn.to_q.weight")

# Top-level diffusers Linear -> BFL Linear (both with .weight / .bias).
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped, see swap_halves
}
SWAPPED = "final_layer.adaLN_modulation.1"
# transformer_blocks.N.<stem> -> double_blocks.N.<stem>, part, parts (parts > 1: concatenated along dim 0).
_DOUBLE = {
    "norm1.linear": ("img_mod.lin", 0, 1),
    "norm1_context.linear": ("txt_mod.lin", 0, 1),
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1),
    "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1),
    "ff_context.net.2": ("txt_mlp.2", 0, 1),
}
_DOUBLE_NORMS = {  # RMSNorm weights: diffusers `.weight` -> BFL `.scale`
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_SINGLE = {
    "norm.linear": ("modulation.lin", 0, 1),
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
}
_SINGLE_NORMS = {
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)")
_PARAM = re.compile(r"(.+)\.(weight|bias)")


# ---------------------------------------------------------------------------------------------------- reading


def _find_weights(path: Path) -> Path:
    """The index json or single safetensors file a diffusers model folder (root or `transformer/`) holds."""
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    for name in (INDEX_NAME, WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if not indexes and len(files) == 1:
        return files[0]
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES + (".bin.index.json",)))
    if pickles:
        raise ModelFileError(path, f"only safetensors weights are supported; {folder} holds pickle-based "
                                   f"{', '.join(pickles[:3])} (loading one can run arbitrary code)")
    found = ", ".join(p.name for p in indexes + files) or "none"
    raise ModelFileError(path, f"no loadable Flux transformer in {folder}: expected {INDEX_NAME} with its shards, "
                               f"or {WEIGHTS_NAME} (also looked in transformer/); safetensors files found: {found}")


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(index, f"malformed index json: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(index, "malformed index json: no \"weight_map\" object of tensor name -> shard file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ModelFileError(index, f"malformed index json: tensor {name!r} maps to {shard!r}, not a shard "
                                        f"file name beside the index")
    return weight_map


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = _read_index(index)
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if not s.endswith(".safetensors")]
    if bad:
        raise ModelFileError(index, f"shard {bad[0]!r}: only safetensors shards are supported (pickle-based "
                                    f"shards can run arbitrary code)")
    tensors, origin = {}, {}
    for shard in shards:
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise ModelFileError(index, f"missing shard {shard} (expected at {shard_path})")
        shard_tensors, _ = read_safetensors(shard_path)
        for name, tensor in shard_tensors.items():
            if name in origin:
                raise ModelFileError(index, f"tensor {name!r} is in two shards: {origin[name]} and {shard}")
            origin[name] = shard
            tensors[name] = tensor
    for name, shard in origin.items():
        listed = weight_map.get(name)
        if listed != shard:
            where = f"the index maps it to {listed}" if listed else "the index does not list it"
            raise ModelFileError(index, f"tensor {name!r} is in shard {shard} but {where}")
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise ModelFileError(index, f"{len(missing)} tensor(s) listed in the index are absent from their shard: "
                                    + ", ".join(f"{n!r} (in {weight_map[n]})" for n in missing[:3]))
    return tensors


def read_folder(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers model folder (model root with `transformer/`, or the transformer folder itself)
    or of a `*.index.json` and its shards, by stored name, as views of the files' memory maps."""
    path = Path(path)
    weights = path if path.is_file() else _find_weights(path)
    if weights.name.endswith(".index.json"):
        return _read_sharded(weights)
    tensors, _ = read_safetensors(weights)
    return tensors


# ---------------------------------------------------------------------------------------------------- renaming


def _prefix(tensors) -> str | None:
    for prefix in PREFIXES:
        if any(prefix + marker in tensors for marker in MARKERS):
            return prefix
    return None


def is_diffusers(tensors) -> bool:
    """Whether the names are those of diffusers' `FluxTransformer2DModel` (possibly under a prefix)."""
    return _prefix(tensors) is not None


def bfl_name(name: str):
    """(BFL name, part, parts) for a prefix-free diffusers name, or None when it is not a Flux transformer's."""
    if m := _BLOCK.fullmatch(name):
        kind, index, rest = m.groups()
        single = kind == "single_transformer_blocks"
        bfl_block = f"{'single_blocks' if single else 'double_blocks'}.{index}."
        norms, linears = (_SINGLE_NORMS, _SINGLE) if single else (_DOUBLE_NORMS, _DOUBLE)
        if rest in norms:
            return bfl_block + norms[rest], 0, 1
        if (p := _PARAM.fullmatch(rest)) and p.group(1) in linears:
            stem, part, parts = linears[p.group(1)]
            return f"{bfl_block}{stem}.{p.group(2)}", part, parts
        return None
    if (p := _PARAM.fullmatch(name)) and p.group(1) in _TOP:
        return f"{_TOP[p.group(1)]}.{p.group(2)}", 0, 1
    return None


def _cat(parts: list, name: str, path):
    """Concatenate along dim 0: tensors with torch.cat, same-format `QTensor`s by their raw rows."""
    if all(isinstance(t, torch.Tensor) for t in parts):
        if len({(t.dtype, tuple(t.shape[1:])) for t in parts}) != 1:
            raise ModelFileError(path, f"{name}: the diffusers parts it is made of differ in dtype or shape: "
                                       + ", ".join(f"{t.dtype}{list(t.shape)}" for t in parts))
        return torch.cat(parts, dim=0)
    if all(isinstance(t, QTensor) for t in parts) and len(parts[0].shape) >= 2:
        kinds = {(t.format, t.scale, tuple(t.shape[1:])) for t in parts}
        if len(kinds) == 1:
            shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
            return QTensor(torch.cat([t.raw for t in parts], dim=0), parts[0].format, shape, parts[0].scale)
    raise ModelFileError(path, f"{name}: cannot concatenate its diffusers parts, stored in different formats: "
                               + ", ".join(type(t).__name__ + (f" {t.format}" if isinstance(t, QTensor) else
                                                               f" {t.dtype}") for t in parts))


def swap_halves(t, name: str, path):
    """diffusers' `norm_out.linear` (scale, shift) -> BFL's `final_layer.adaLN_modulation.1` (shift, scale):
    the inverse of diffusers' `swap_scale_shift`, which is its own inverse."""
    rows = t.shape[0]
    if rows % 2:
        raise ModelFileError(path, f"{name}: {rows} output rows cannot be split into scale and shift halves")
    half = rows // 2
    if isinstance(t, torch.Tensor):
        return torch.cat([t[half:], t[:half]], dim=0)
    if len(t.shape) >= 2:
        per_row = t.raw.shape[0] // rows
        raw = torch.cat([t.raw[half * per_row:], t.raw[:half * per_row]], dim=0)
        return QTensor(raw, t.format, t.shape, t.scale)
    raise ModelFileError(path, f"{name}: a quantized 1-D tensor cannot be split into scale and shift halves")


def to_bfl(tensors, path) -> dict:
    """The same tensors under BFL's Flux names. Tensors outside the diffusers prefix (a pipeline file's VAE and
    text encoders) are dropped; unknown names under it raise `ModelFileError`."""
    prefix = _prefix(tensors)
    if prefix is None:
        raise ModelFileError(path, "not a diffusers Flux transformer (no x_embedder / transformer_blocks tensors)")
    groups: dict[str, list] = {}
    unknown = []
    for full_name, tensor in tensors.items():
        if not full_name.startswith(prefix):
            continue
        name = full_name[len(prefix):]
        target = bfl_name(name)
        if target is None:
            unknown.append(full_name)
            continue
        bfl, part, parts = target
        slots = groups.setdefault(bfl, [None] * parts)
        if slots[part] is not None:  # cannot happen with distinct names, kept as a guard
            raise ModelFileError(path, f"two diffusers tensors map to part {part} of {bfl}")
        slots[part] = (full_name, tensor)
    if unknown:
        raise ModelFileError(path, f"{len(unknown)} tensor(s) with names that are not those of a diffusers Flux "
                                   f"transformer: {', '.join(sorted(unknown)[:5])}")
    out = {}
    for bfl, slots in groups.items():
        if any(s is None for s in slots):
            have = [s[0] for s in slots if s is not None]
            raise ModelFileError(path, f"{bfl} is split in {len(slots)} diffusers tensors but only "
                                       f"{', '.join(have)} is present")
        parts = [t for _, t in slots]
        tensor = parts[0] if len(parts) == 1 else _cat(parts, bfl, path)
        if bfl.startswith(SWAPPED + "."):
            tensor = swap_halves(tensor, bfl, path)
        out[bfl] = tensor
    return out
