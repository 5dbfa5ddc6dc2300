"""Finding and loading the CLIP and T5 tokenizers: from a folder, a T5 GGUF's metadata, the local Hugging Face cache
(offline: nothing is ever downloaded) or an explicit path.

Both are called as BFL's `HFEmbedder` calls them: truncation and padding to `max_length`, no attention mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.errors import ModelFileError

# Where the tokenizers of the released encoders live in a Hugging Face cache: (repo, subfolder).
CACHED_TOKENIZERS = {
    "clip": (("openai/clip-vit-large-patch14", ""), ("black-forest-labs/FLUX.1-dev", "tokenizer"),
             ("black-forest-labs/FLUX.1-schnell", "tokenizer")),
    "t5": (("google/t5-v1_1-xxl", ""), ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
           ("black-forest-labs/FLUX.1-schnell", "tokenizer_2")),
}
# Files that make a tokenizer folder, any one group suffices.
TOKENIZER_FILES = {"clip": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
                   "t5": (("spiece.model",), ("tokenizer.json",))}
WHAT_TO_PASS = {
    "clip": "a folder with CLIP-L's vocab.json and merges.txt (FLUX.1-dev's tokenizer/ or "
            "openai/clip-vit-large-patch14)",
    "t5": "a folder with T5's spiece.model or tokenizer.json (FLUX.1-dev's tokenizer_2/ or google/t5-v1_1-xxl), "
          "or a T5 GGUF that embeds its tokenizer",
}


def hf_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def hf_snapshot(repo_id: str) -> Path | None:
    """The newest local snapshot of a hub repository, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=hf_cache_dir(), local_files_only=True))
    except (OSError, ValueError):  # huggingface_hub's LocalEntryNotFoundError is an OSError; bad repo ids ValueError
        return None


def is_tokenizer_folder(folder: Path, kind: str) -> bool:
    return folder.is_dir() and any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES[kind])


def cached_tokenizer(kind: str) -> Path | None:
    for repo, sub in CACHED_TOKENIZERS[kind]:
        snapshot = hf_snapshot(repo)
        if snapshot is not None and is_tokenizer_folder(snapshot / sub, kind):
            return snapshot / sub
    return None


def missing_tokenizer(path, kind: str) -> ModelFileError:
    repos = ", ".join(f"{repo}/{sub}".rstrip("/") for repo, sub in CACHED_TOKENIZERS[kind])
    return ModelFileError(path, f"no {kind.upper()} tokenizer found: none beside the weights and none in the Hugging "
                                f"Face cache {hf_cache_dir()} ({repos}); nothing is downloaded, so pass tokenizer= "
                                f"{WHAT_TO_PASS[kind]}")


def load_tokenizer(kind: str, source: Path):
    """A transformers tokenizer from a tokenizer folder, or from a T5 GGUF's metadata."""
    from transformers import CLIPTokenizer, T5Tokenizer

    if source.is_file() and kind == "t5":
        from engine.text_encoders.gguf_t5 import tokenizer_from_gguf

        return tokenizer_from_gguf(source)
    if not is_tokenizer_folder(source, kind):
        groups = " or ".join(" + ".join(group) for group in TOKENIZER_FILES[kind])
        raise ModelFileError(source, f"not a {kind.upper()} tokenizer (expected {groups}); pass {WHAT_TO_PASS[kind]}")
    try:
        return (CLIPTokenizer if kind == "clip" else T5Tokenizer).from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(source, f"cannot load the {kind.upper()} tokenizer: {type(e).__name__}: {e}") from None


def tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids `(B, max_length)` as BFL's HFEmbedder makes them: truncated, padded to max_length."""
    if isinstance(prompts, str):
        prompts = [prompts]
    batch = tokenizer(list(prompts), truncation=True, max_length=max_length, return_length=False,
                      return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
    return batch["input_ids"]
