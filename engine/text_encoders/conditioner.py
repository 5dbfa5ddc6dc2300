"""`TextConditioner`: Flux's two text inputs for a batch of prompts, through the prompt cache.

`encode(prompts)` returns `txt` (T5 `last_hidden_state`, `(B, max_length, d_t5)`) and `vec` (CLIP `pooler_output`,
`(B, d_clip)`), both in the compute dtype `dtype`. Each encoder is loaded on first need only: prompts already in the
cache load neither (their files are only looked at: paths, sizes and modification times make the cache key).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from engine.text_encoders import layouts
from engine.text_encoders.cache import PromptCache, default_cache_dir, file_identity, prompt_key
from engine.text_encoders.encoders import CLIP_MAX_LENGTH, TextEncoder, load_clip, load_t5


class TextConditioner:
    def __init__(self, clip_path, t5_path, clip_tokenizer=None, t5_tokenizer=None, max_length: int = 512,
                 dtype: torch.dtype = torch.bfloat16, cache: bool = True, cache_dir=None):
        self.dtype = dtype
        self.sources = {"clip": (clip_path, clip_tokenizer, CLIP_MAX_LENGTH), "t5": (t5_path, t5_tokenizer, max_length)}
        self.cache = PromptCache(Path(cache_dir) if cache_dir else default_cache_dir()) if cache else None
        self.encoders: dict[str, TextEncoder] = {}
        self._identities: dict[str, str] = {}

    def encoder(self, kind: str) -> TextEncoder:
        """The loaded encoder, loading it now if needed."""
        if kind not in self.encoders:
            path, tokenizer, max_length = self.sources[kind]
            if kind == "clip":
                self.encoders[kind] = load_clip(path, tokenizer, self.dtype)
            else:
                self.encoders[kind] = load_t5(path, tokenizer, max_length, self.dtype)
        return self.encoders[kind]

    def _identity(self, kind: str) -> str:
        if kind not in self._identities:
            path, tokenizer, max_length = self.sources[kind]
            files = layouts.locate(path, kind, tokenizer)
            if tokenizer is not None and not isinstance(tokenizer, (str, Path)):  # a tokenizer object: its content
                tokenizer_id = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
            else:
                tokenizer_id = None
            self._identities[kind] = json.dumps([kind, file_identity(files.files()), tokenizer_id, max_length,
                                                 str(self.dtype)])
        return self._identities[kind]

    def _embed(self, kind: str, prompts: list[str], device) -> torch.Tensor:
        if self.cache is None:
            return self.encoder(kind).encode(prompts, device)
        keys = [prompt_key(self._identity(kind), p) for p in prompts]
        rows = [self.cache.get(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = self.encoder(kind).encode([prompts[i] for i in missing], device)
            for i, row in zip(missing, fresh):
                self.cache.put(keys[i], row)
                rows[i] = row
        return torch.stack([row.to(device or "cpu") for row in rows])

    @torch.inference_mode()
    def encode(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt `(B, L, d_t5)`, vec `(B, d_clip)`) in the compute dtype, on `device` (CPU when None)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._embed("t5", prompts, device), self._embed("clip", prompts, device)

    def release(self) -> None:
        """Free the loaded encoders (the prompt cache stays)."""
        self.encoders.clear()
