"""Prompt embeddings cached in memory (LRU) and on disk (one safetensors file per prompt and encoder).

A key is the SHA-256 of the encoder's identity (its weight and tokenizer files: path, size, modification time), the
compute dtype, max_length and the prompt; so a changed or replaced file, another tokenizer or another max_length never
hits an old entry. Files are written to a temporary and renamed, so a crash leaves no torn entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

APP = "flux-quant-engine"
MEMORY_ENTRIES = 64  # a T5 entry at 512 tokens is 4 MiB in bf16: 256 MiB at most


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / APP / "prompts"


def file_identity(files: list[Path]) -> str:
    """Names, sizes and modification times of `files`: cheap, and changes whenever a file is replaced."""
    described = []
    for f in files:
        stat = f.stat()
        described.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    return json.dumps(described)


def prompt_key(encoder_identity: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([encoder_identity, prompt]).encode()).hexdigest()


class PromptCache:
    """`get(key)` / `put(key, tensor)` over an in-memory LRU and, when `directory` is set, a folder of safetensors."""

    def __init__(self, directory: Path | None, memory_entries: int = MEMORY_ENTRIES):
        self.directory = None if directory is None else Path(directory)
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memory_entries = memory_entries

    def _remember(self, key: str, value: torch.Tensor) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.memory_entries:
            self.memory.popitem(last=False)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        if self.directory is None:
            return None
        path = self.directory / f"{key}.safetensors"
        try:
            value = load_file(path)["embedding"]
        except (OSError, SafetensorError, KeyError):  # absent, or unreadable: encode again and overwrite it
            return None
        self._remember(key, value)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu").contiguous()
        self._remember(key, value)
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)
        os.close(fd)
        try:
            save_file({"embedding": value}, tmp)
            os.replace(tmp, self.directory / f"{key}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
