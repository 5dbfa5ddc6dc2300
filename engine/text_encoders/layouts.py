"""Where a CLIP-L or T5 encoder's weights, config and tokenizer are, for every file layout users have, and reading
the weights under transformers' names (`embeddings.token_embedding.weight`, `encoder.block.0.layer.0...`).

- Hugging Face / diffusers folders: `text_encoder/`, `text_encoder_2/` (sharded, with `model.safetensors.index.json`),
  beside `tokenizer/`, `tokenizer_2/`; a FLUX.1 diffusers root (`text_encoder/` + `text_encoder_2/` inside); a repo id
  (`black-forest-labs/FLUX.1-dev`) found in the local Hugging Face cache.
- ComfyUI single files: `clip_l.safetensors` (`text_model.*`), `t5xxl_fp16 / fp8_e4m3fn / fp8_e4m3fn_scaled`
  (`encoder.*`, `shared.weight`), and all-in-one checkpoints holding `text_encoders.clip_l.transformer.*` /
  `text_encoders.t5xxl.transformer.*` beside the transformer (ComfyUI fp8, Forge NF4 v2 bundles).
- city96's T5 GGUF files (`gguf_t5`).

Only the encoder's own tensors are taken from an all-in-one file (under its prefix) before FP8 scales or NF4 groups
are resolved, so the transformer beside them is never touched. Weights stay views of the file's memory map.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoints import forge_nf4, fp8, what_it_looks_like
from engine.checkpoints.gguf_file import MAGIC as GGUF_MAGIC
from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError
from engine.text_encoders import gguf_t5, tokenization

# diffusers pipeline subfolders per encoder: (weights, tokenizer)
SUBFOLDERS = {"clip": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")}
# Prefixes an encoder's tensors may carry in a single file (all-in-one checkpoints first), then the prefix of
# transformers' older CLIP layout, stripped to reach `CLIPTextModel`'s current names.
PREFIXES = {"clip": ("text_encoders.clip_l.transformer.", "text_encoder.", ""),
            "t5": ("text_encoders.t5xxl.transformer.", "text_encoder_2.", "")}
MARKERS = {"clip": "encoder.layers.0.self_attn.q_proj.weight", "t5": "encoder.block.0.layer.0.SelfAttention.q.weight"}
LOOKALIKES = {  # a tensor name typical of another kind of file -> what it is
    "double_blocks.0.img_attn.qkv.weight": "a Flux transformer",
    "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": "a Flux transformer",
    "transformer_blocks.0.attn.to_q.weight": "a diffusers Flux transformer",
    "text_model.encoder.layers.0.self_attn.q_proj.weight": "a CLIP text encoder",
    "encoder.block.0.layer.0.SelfAttention.q.weight": "a T5 encoder",
    "decoder.conv_in.weight": "a VAE",
    "model.diffusion_model.input_blocks.0.0.weight": "a UNet (SD 1.x / SDXL) checkpoint",
}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHTS = "model.safetensors"
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class EncoderFiles:
    kind: str  # "clip" or "t5"
    path: Path  # what the user passed (named in errors)
    weights: Path  # a model folder, a safetensors file, a sharded index or a GGUF
    tokenizer: Path | None  # a tokenizer folder or a GGUF embedding one; None: none found

    @property
    def is_gguf(self) -> bool:
        return self.weights.is_file() and _magic(self.weights) == GGUF_MAGIC

    def files(self) -> list[Path]:
        """Every file the encoder's weights and tokenizer are read from (the prompt cache's notion of identity)."""
        found = []
        for place in (self.weights, self.tokenizer):
            if place is not None:
                found += sorted(p for p in place.iterdir() if p.is_file()) if place.is_dir() else [place]
        return found


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def locate(path, kind: str, tokenizer=None) -> EncoderFiles:
    """Resolve `path` (file, folder or cached repo id) to the encoder's weights and its tokenizer's source: `tokenizer`
    if given, else one beside the weights or inside a T5 GGUF, else one in the Hugging Face cache."""
    user_path = Path(path)
    path = user_path
    if not path.exists():
        snapshot = tokenization.hf_snapshot(str(user_path)) if REPO_ID.fullmatch(str(user_path)) else None
        if snapshot is None:
            raise ModelFileError(user_path, f"no such file or folder, and no snapshot of it in the Hugging Face cache "
                                            f"{tokenization.hf_cache_dir()} (nothing is downloaded)")
        path = snapshot
    weights_sub, tokenizer_sub = SUBFOLDERS[kind]
    beside = None
    if path.is_dir():
        if (path / weights_sub).is_dir():  # a diffusers pipeline root
            path, beside = path / weights_sub, path / tokenizer_sub
        elif path.name == weights_sub:
            beside = path.parent / tokenizer_sub
    elif path.name.endswith(".index.json"):
        beside = path.parent.parent / tokenizer_sub if path.parent.name == weights_sub else None
    if tokenizer is not None:
        source = None if not isinstance(tokenizer, (str, Path)) else Path(tokenizer)
    elif path.is_dir() and tokenization.is_tokenizer_folder(path, kind):
        source = path
    elif beside is not None and tokenization.is_tokenizer_folder(beside, kind):
        source = beside
    elif kind == "t5" and path.is_file() and _magic(path) == GGUF_MAGIC and gguf_t5.has_tokenizer(path):
        source = path
    else:
        source = tokenization.cached_tokenizer(kind)
    return EncoderFiles(kind, user_path, path, source)


def _folder_tensors(folder: Path) -> dict:
    index = folder / (WEIGHTS + ".index.json")
    if index.is_file():
        return _sharded_tensors(index)
    if (folder / WEIGHTS).is_file():
        return read_safetensors(folder / WEIGHTS)[0]
    if any((folder / name).is_file() for name in PICKLE_WEIGHTS):
        raise ModelFileError(folder, "only pickle weights (pytorch_model.bin): loading one can run arbitrary code, "
                                     "so it is refused; use a folder with model.safetensors")
    raise ModelFileError(folder, f"no {WEIGHTS} or {WEIGHTS}.index.json in this folder")


def _sharded_tensors(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(index, f"corrupt shard index: {type(e).__name__}: {e}") from None
    tensors = {}
    for shard in shards:
        shard_path = index.parent / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise ModelFileError(index, f"shard {shard!r} is missing")
        tensors.update(read_safetensors(shard_path)[0])
    return tensors


def _file_tensors(path: Path) -> dict:
    if path.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl"):
        raise ModelFileError(path, "pickle-based checkpoint: loading one can run arbitrary code, so it is refused; "
                                   "use a .safetensors or .gguf file")
    return read_safetensors(path)[0]


def _select(tensors: dict, files: EncoderFiles) -> dict:
    """The encoder's tensors under `CLIPTextModel` / `T5EncoderModel` names, FP8 scales and NF4 groups resolved."""
    kind = files.kind
    for prefix in PREFIXES[kind]:
        chosen = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if kind == "clip":
            chosen = {name.removeprefix("text_model."): t for name, t in chosen.items()}
        if MARKERS[kind] in chosen:
            break
    else:
        other = "; it holds no text encoder" if any(k.startswith("double_blocks.") or ".double_blocks." in k
                                                     for k in tensors) else what_it_looks_like(tensors, LOOKALIKES)
        raise ModelFileError(files.path, f"not a {'CLIP' if kind == 'clip' else 'T5'} text encoder "
                                         f"(no {MARKERS[kind]}){other}")
    chosen = fp8.apply_scales(forge_nf4.to_qtensors(chosen, files.weights), files.weights)
    if kind == "t5" and "shared.weight" not in chosen and "encoder.embed_tokens.weight" in chosen:
        chosen["shared.weight"] = chosen["encoder.embed_tokens.weight"]
    chosen.pop("encoder.embed_tokens.weight", None)
    return chosen


def read_weights(files: EncoderFiles) -> tuple[dict, dict, object | None]:
    """(tensors by model name, GGUF metadata or {}, transformers config from config.json or None)."""
    from transformers import CLIPTextConfig, T5Config

    weights = files.weights
    if files.is_gguf:
        if files.kind != "t5":
            raise ModelFileError(weights, "a GGUF file: only T5 encoders are read from GGUF, CLIP-L from safetensors")
        return *gguf_t5.read_t5_gguf(weights), None
    if weights.is_dir():
        tensors = _folder_tensors(weights)
    elif weights.name.endswith(".index.json"):
        tensors = _sharded_tensors(weights)
    else:
        tensors = _file_tensors(weights)
    config = None
    folder = weights if weights.is_dir() else weights.parent
    if (folder / "config.json").is_file() and (weights.is_dir() or weights.name.endswith(".index.json")):
        config_class = CLIPTextConfig if files.kind == "clip" else T5Config
        config = config_class.from_pretrained(folder, local_files_only=True)
    return _select(tensors, files), {}, config

