"""`load_clip` / `load_t5`: an encoder from any file users have, with BFL's `HFEmbedder` semantics.

CLIP-L: 77 tokens, truncated and padded, `pooler_output` (no text projection; transformers pools at
argmax(input_ids) under the released config's eos_token_id 2). T5: `max_length` tokens (512 for dev, 256 for
schnell), truncated and padded, no attention mask, `last_hidden_state`.

Weights stay in CPU memory. `encode(prompts)` runs on the CPU, decoding one Linear's weight at a time;
`encode(prompts, device="cuda")` streams the blocks through the GPU (`streaming`), unless the encoder was made
resident there with `with encoder.resident("cuda"):`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from engine.errors import ModelFileError
from engine.text_encoders import layouts, models, tokenization
from engine.text_encoders.streaming import BlockStreamer

CLIP_MAX_LENGTH = 77


class TextEncoder:
    """A CLIP or T5 encoder in CPU memory with its tokenizer: `tokenize(prompts)`, `encode(prompts, device=None)`."""

    def __init__(self, kind: str, model, tokenizer, max_length: int, dtype: torch.dtype, files: layouts.EncoderFiles):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.max_length, self.dtype, self.files = max_length, dtype, files
        self.streamer = BlockStreamer(model, models.transformer_blocks(model))
        self._resident_on: torch.device | None = None

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenization.tokenize(self.tokenizer, prompts, self.max_length)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=None)
        return (out.pooler_output if self.kind == "clip" else out.last_hidden_state).to(self.dtype)

    @torch.inference_mode()
    def encode(self, prompts: list[str], device=None) -> torch.Tensor:
        """CLIP: `(B, hidden)` pooled; T5: `(B, max_length, d_model)`; in the compute dtype, on `device`."""
        device = torch.device(device or "cpu")
        ids = self.tokenize(prompts).to(device)
        if device.type == "cpu" or device == self._resident_on:
            return self._forward(ids)
        if device.type != "cuda":
            with self.resident(device):
                return self._forward(ids)
        with self.streamer.streamed(device):
            return self._forward(ids)

    @contextmanager
    def resident(self, device):
        """Keep every weight on `device` inside the block (for repeated encodes where memory allows, and as the
        benchmark's baseline); they return to CPU memory afterwards."""
        device = torch.device(device)
        with self.streamer.resident(device):
            self._resident_on = device
            try:
                yield self
            finally:
                self._resident_on = None


def _tokenizer(files: layouts.EncoderFiles, tokenizer, kind: str):
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer  # an already built transformers tokenizer
    if files.tokenizer is None:
        raise tokenization.missing_tokenizer(files.path, kind)
    return tokenization.load_tokenizer(kind, files.tokenizer)


def _load(kind: str, path, tokenizer, max_length: int, dtype: torch.dtype) -> TextEncoder:
    files = layouts.locate(path, kind, tokenizer)
    tensors, metadata, config = layouts.read_weights(files)
    try:
        if kind == "clip":
            model = models.build_clip(tensors, config or models.clip_config(tensors), dtype)
        else:
            model = models.build_t5(tensors, config or models.t5_config(tensors, metadata), dtype)
    except (KeyError, ValueError) as e:
        raise ModelFileError(files.weights, f"not a usable {kind.upper()} encoder: {e}") from None
    return TextEncoder(kind, model, _tokenizer(files, tokenizer, kind), max_length, dtype, files)


def load_clip(path, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
    """CLIP-L from a diffusers/Hugging Face folder, a repo id in the local Hugging Face cache, ComfyUI's
    clip_l.safetensors or an all-in-one checkpoint. `tokenizer`: a folder, or a transformers tokenizer."""
    return _load("clip", path, tokenizer, CLIP_MAX_LENGTH, dtype)


def load_t5(path, tokenizer=None, max_length: int = 512, dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
    """T5-XXL from a diffusers/Hugging Face folder, a cached repo id, ComfyUI's t5xxl_*.safetensors (FP16, FP8,
    scaled FP8), an all-in-one checkpoint or city96's GGUF. `max_length`: 512 for FLUX.1-dev, 256 for schnell."""
    return _load("t5", path, tokenizer, max_length, dtype)
