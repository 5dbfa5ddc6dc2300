"""city96's T5 encoder GGUF files (`general.architecture = t5encoder`, written by llama.cpp's `convert_hf_to_gguf.py`
and quantized by llama-quantize): reading them as transformers-named tensors, their embedded tokenizer, and writing
them (`save_t5_gguf`).

Names are llama.cpp's (`gguf.constants.TENSOR_NAMES`), mapped one to one onto `T5EncoderModel`'s:

    token_embd                shared (= encoder.embed_tokens)
    enc.blk.N.attn_q/k/v/o    encoder.block.N.layer.0.SelfAttention.q/k/v/o
    enc.blk.0.attn_rel_b      encoder.block.0.layer.0.SelfAttention.relative_attention_bias (block 0 only)
    enc.blk.N.attn_norm       encoder.block.N.layer.0.layer_norm
    enc.blk.N.ffn_gate/up     encoder.block.N.layer.1.DenseReluDense.wi_0/wi_1 (ungated T5: ffn_up = wi)
    enc.blk.N.ffn_down        encoder.block.N.layer.1.DenseReluDense.wo
    enc.blk.N.ffn_norm        encoder.block.N.layer.1.layer_norm
    enc.output_norm           encoder.final_layer_norm

Shapes are stored innermost first (`read_gguf` reverses them); ComfyUI-GGUF's optional `comfy.gguf.orig_shape.<name>`
array overrides a tensor's logical shape. The tokenizer (llama.cpp's T5 vocab: the SentencePiece pieces with their
scores and types, padded to the embedding's rows with `[PAD<i>]` tokens of type UNUSED, the normalizer's
`precompiled_charsmap`, pad 0 / eos 1 / unk 2) is rebuilt as transformers' Unigram `T5Tokenizer`, with the 100
`<extra_id_N>` sentinels where the Hugging Face tokenizer has them.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.checkpoints.gguf_file import ARRAY, SCALAR_SIZES, STRING, _walk_header
from engine.errors import ModelFileError
from kernels.formats import format_from_ggml_type, get_format
from kernels.qtensor import QTensor

ARCHITECTURE = "t5encoder"
TOP_NAMES = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
BLOCK_NAMES = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
GGUF_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.weight")
HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)\.weight")
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# llama.cpp's SentencePiece token types (convert_hf_to_gguf.SentencePieceTokenTypes)
NORMAL, UNKNOWN, CONTROL, UNUSED = 1, 2, 3, 5
SCALAR_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # GGUFValueType -> little-endian numpy
EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, after the SentencePiece pieces in Hugging Face's vocabulary
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.precompiled_charsmap",
                  "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id")


def to_hf_name(name: str) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    match = GGUF_BLOCK.fullmatch(name)
    if match and match[2] in BLOCK_NAMES:
        return f"encoder.block.{match[1]}.{BLOCK_NAMES[match[2]]}.weight"
    return None


def to_gguf_name(name: str) -> str | None:
    for gguf_name, hf in TOP_NAMES.items():
        if name == hf:
            return gguf_name
    match = HF_BLOCK.fullmatch(name)
    if match:
        stem = match[2].replace("DenseReluDense.wi.", "DenseReluDense.wi_1.")  # ungated T5: wi is llama.cpp's ffn_up
        for gguf_stem, hf_stem in BLOCK_NAMES.items():
            if stem == hf_stem:
                return f"enc.blk.{match[1]}.{gguf_stem}.weight"
    return None


class _Header:
    """A T5 GGUF's header, checked by the checkpoint reader's bounded walk, and its tensors over a copy-on-write
    memory map. gguf's own `GGUFReader` (which `read_gguf` uses) is not used here: it builds one numpy view per
    array element, and the ~240 KB `precompiled_charsmap` every T5 file carries makes it take 11 s per open on this
    project's 2-core machine (measured); this reads the arrays in bulk."""

    def __init__(self, path: Path):
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="c")
        self.metadata, self.infos, self.data_start = _walk_header(path, self.data)

    def arrays(self, wanted) -> dict:
        """Values of the array entries whose key is in `wanted` or starts with ORIG_SHAPE_KEY (the walk above checked
        every length against the file, so this second pass only reads)."""
        data, pos, out = self.data, 24, {}
        n_kv = int(data[16:24].view(np.uint64)[0])

        def u(fmt: str):
            nonlocal pos
            value = struct.unpack_from(fmt, data, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string(keep: bool):
            nonlocal pos
            length = u("<Q")
            pos += length
            return bytes(data[pos - length:pos]).decode("utf-8") if keep else None

        for _ in range(n_kv):
            key = string(True)
            value_type = u("<I")
            keep = key in wanted or key.startswith(ORIG_SHAPE_KEY)
            if value_type == STRING:
                string(False)
            elif value_type in SCALAR_SIZES:
                pos += SCALAR_SIZES[value_type]
            elif value_type == ARRAY:
                item_type, count = u("<I"), u("<Q")
                if item_type == STRING:
                    items = [string(keep) for _ in range(count)]
                elif item_type in SCALAR_SIZES:
                    items = np.frombuffer(data, SCALAR_DTYPES[item_type], count, pos)
                    pos += count * SCALAR_SIZES[item_type]
                else:
                    raise ModelFileError(self.path, f"metadata {key!r}: nested arrays are not expected in a T5 GGUF")
                if keep:
                    out[key] = items
        return out

    def tensors(self) -> dict[str, torch.Tensor | QTensor]:
        """Stored name -> QTensor (quantized) or plain tensor, views of the map (what `read_gguf` returns)."""
        tensors = {}
        for name, shape, type_id, offset in self.infos:
            fmt = format_from_ggml_type(type_id)
            start = self.data_start + offset
            raw = torch.from_numpy(self.data[start:start + math.prod(shape) // fmt.block_size * fmt.block_bytes])
            if fmt.is_quantized:
                tensors[name] = QTensor(raw.view(math.prod(shape[:-1]), -1), fmt.name, shape)
            else:
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name]
                if start % dtype.itemsize:  # a wider view needs an aligned start (only with general.alignment < 4)
                    raw = raw.clone()
                tensors[name] = raw.view(dtype).view(shape)
        return tensors


def _with_shape(path: Path, t: torch.Tensor | QTensor, shape: tuple[int, ...], name: str) -> torch.Tensor | QTensor:
    if math.prod(shape) != math.prod(t.shape):
        raise ModelFileError(path, f"{ORIG_SHAPE_KEY}{name} {list(shape)} does not hold the {list(t.shape)} stored")
    if isinstance(t, torch.Tensor):
        return t.reshape(shape)
    if shape[-1] % t.fmt.block_size:
        raise ModelFileError(path, f"{ORIG_SHAPE_KEY}{name} {list(shape)}: rows are not whole {t.format} blocks")
    return QTensor(t.raw.reshape(math.prod(shape[:-1]), -1), t.format, shape, t.scale)


def read_t5_gguf(path: Path) -> tuple[dict, dict]:
    """(transformers-named tensors, scalar metadata) of a T5 encoder GGUF; quantized tensors stay memory-mapped."""
    header = _Header(path)
    arch = header.metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ModelFileError(path, f"GGUF architecture {arch!r} is not a T5 encoder ({ARCHITECTURE!r})")
    shapes = {key[len(ORIG_SHAPE_KEY):]: tuple(int(d) for d in value) for key, value in header.arrays(()).items()}
    out = {}
    for name, t in header.tensors().items():
        hf = to_hf_name(name)
        if hf is None:
            raise ModelFileError(path, f"unexpected tensor {name!r} in a {ARCHITECTURE} GGUF")
        out[hf] = _with_shape(path, t, shapes[name], name) if name in shapes else t
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in out:  # ungated T5 (v1.0): ffn_up is wi
        out = {name.replace("DenseReluDense.wi_1.", "DenseReluDense.wi."): t for name, t in out.items()}
    return out, header.metadata


def has_tokenizer(path: Path) -> bool:
    return _Header(path).metadata.get("tokenizer.ggml.model") is not None


def tokenizer_from_gguf(path: Path):
    """The GGUF's embedded T5 tokenizer as transformers' `T5Tokenizer` (a fast Unigram tokenizer)."""
    from transformers import T5Tokenizer

    header = _Header(path)
    fields = {**header.metadata, **header.arrays(TOKENIZER_KEYS)}
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFileError(path, "this GGUF embeds no tokenizer (no tokenizer.ggml.model); pass tokenizer= a "
                                   "folder with the T5 tokenizer (spiece.model or tokenizer.json)")
    if model != "t5":
        raise ModelFileError(path, f"embedded tokenizer is {model!r}, not a T5 SentencePiece Unigram ('t5')")
    tokens, scores, types = (fields.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    if not tokens or scores is None or types is None or not len(tokens) == len(scores) == len(types):
        raise ModelFileError(path, "embedded T5 tokenizer lacks tokens, scores or token types of equal length")
    pieces = len(tokens)
    while pieces and types[pieces - 1] == UNUSED:  # llama.cpp's [PAD<i>] rows up to the embedding's vocab size
        pieces -= 1
    extra = min(EXTRA_IDS, len(tokens) - pieces)
    vocab = [(tokens[i], float(scores[i])) for i in range(pieces)]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1)]
    special = {}
    for role, key, default in (("pad_token", "padding_token_id", 0), ("eos_token", "eos_token_id", 1),
                               ("unk_token", "unknown_token_id", 2)):
        index = fields.get(f"tokenizer.ggml.{key}", default)
        if not 0 <= index < pieces:
            raise ModelFileError(path, f"embedded tokenizer: {key} {index} is outside its {pieces} pieces")
        special[role] = tokens[index]
    charsmap = fields.get("tokenizer.ggml.precompiled_charsmap")
    return T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=None if charsmap is None else np.asarray(charsmap).astype(np.uint8).tobytes(),
                       extra_ids=extra, **special)


def _tokenizer_vocab(tokenizer) -> tuple[list[str], list[float], list[int], bytes | None]:
    """llama.cpp's T5 vocabulary (tokens, scores, types) and charsmap from a Hugging Face T5 tokenizer."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "Unigram":
        raise ValueError(f"a T5 tokenizer is a SentencePiece Unigram, got a {spec['model']['type']} model")
    vocab = [(piece, score) for piece, score in spec["model"]["vocab"] if not piece.startswith("<extra_id_")]
    control = {tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token} - {None}
    types = [UNKNOWN if piece == tokenizer.unk_token else CONTROL if piece in control else NORMAL
             for piece, _ in vocab]
    normalizers = [spec["normalizer"]] if spec.get("normalizer") else []
    normalizers += normalizers[0].get("normalizers", []) if normalizers else []
    charsmap = next((base64.b64decode(n["precompiled_charsmap"]) for n in normalizers
                     if n.get("type") == "Precompiled"), None)
    return [p for p, _ in vocab], [float(s) for _, s in vocab], types, charsmap


def _gguf_format(name: str, shape: tuple[int, ...], type: str) -> str:
    """`type` for the 2-D weights (Linears and the token embedding), F32 for norms and the relative bias; F16 where
    a row is not a whole number of `type`'s blocks (as llama.cpp's quantizer falls back)."""
    if len(shape) != 2 or "attn_rel_b" in name:
        return "F32"
    return type if shape[-1] % get_format(type).block_size == 0 else "F16"


def save_t5_gguf(path, state_dict_or_model, tokenizer, type: str = "Q8_0", context_length: int = 512) -> Path:
    """Write a T5 encoder as a city96-layout `t5encoder` GGUF: llama.cpp names and metadata, the tokenizer embedded,
    2-D weights quantized to `type` (a GGUF format name: Q8_0, Q4_K, F16, ...) with our torch codecs; `QTensor`s
    already in their target format are written as they are. The file is written to a temporary next to `path` and
    renamed into place."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter

    from engine.text_encoders.models import t5_config

    fmt = get_format(type)
    if not fmt.in_gguf:
        raise ValueError(f"{type} cannot be stored in GGUF")
    state = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    state = {name: t for name, t in state.items() if name != "encoder.embed_tokens.weight"}
    config = t5_config(state)
    tokens, scores, types, charsmap = _tokenizer_vocab(tokenizer)
    rows = state["shared.weight"].shape[0]
    if len(tokens) > rows:
        raise ValueError(f"the tokenizer has {len(tokens)} pieces, the embedding only {rows} rows")
    pad = range(len(tokens), rows)
    tokens += [f"[PAD{i}]" for i in pad]
    scores += [-10000.0] * len(pad)
    types += [UNUSED] * len(pad)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, ARCHITECTURE)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        writer.add_context_length(context_length)
        writer.add_embedding_length(config.d_model)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_block_count(config.num_layers)
        writer.add_head_count(config.num_heads)
        writer.add_key_length(config.d_kv)
        writer.add_value_length(config.d_kv)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
        writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
        writer.add_tokenizer_model("t5")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(True)
        writer.add_remove_extra_whitespaces(True)
        if charsmap:
            writer.add_precompiled_charsmap(charsmap)
        writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_unk_token_id(tokenizer.unk_token_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(True)
        for name, t in state.items():
            gguf_name = to_gguf_name(name)
            if gguf_name is None:
                raise ValueError(f"{name} is not a T5 encoder tensor")
            target = _gguf_format(gguf_name, tuple(t.shape), type)
            if isinstance(t, QTensor) and t.format == target and t.scale is None:  # already stored so: no requantizing
                raw = t.raw.cpu().numpy()
                writer.add_tensor(gguf_name, raw, raw_shape=raw.shape,
                                  raw_dtype=GGMLQuantizationType(get_format(target).ggml_type))
                continue
            dense = t.dequantize(torch.float32) if isinstance(t, QTensor) else t.detach().float().cpu()
            if target == "F32":
                writer.add_tensor(gguf_name, dense.numpy())
            elif target == "F16":
                writer.add_tensor(gguf_name, dense.half().numpy())
            else:
                raw = QTensor.quantize(dense, target).raw.numpy()
                writer.add_tensor(gguf_name, raw, raw_shape=raw.shape,
                                  raw_dtype=GGMLQuantizationType(get_format(target).ggml_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
