"""Forge's bitsandbytes NF4 checkpoints (`flux1-dev-bnb-nf4.safetensors`, `flux1-dev-bnb-nf4-v2.safetensors`).

Each quantized Linear weight `X.weight` is what bitsandbytes' `Linear4bit.state_dict()` saves
(`QuantState.as_dict(packed=True)`, read back by `QuantState.from_dict`), all under the prefix `X.weight.`:

    X.weight                                  uint8, the packed 4-bit codes of the flattened weight (numel / 2 bytes,
                                              stored as shape (numel / 2, 1)); element 2i in the high nibble
    X.weight.absmax                           float32 (nblocks,), one per 64 weights; uint8 indices into
                                              nested_quant_map when double-quantized (v1, compress_statistics=True)
    X.weight.quant_map                        float32 (16,), the NF4 code book
    X.weight.nested_absmax                    float32 (ceil(nblocks / 256),)            double-quantized only
    X.weight.nested_quant_map                 float32 (256,), bnb's signed dynamic map   double-quantized only
    X.weight.quant_state.bitsandbytes__nf4    uint8, UTF-8 JSON of the non-tensor fields: quant_type, blocksize,
                                              dtype (the original dtype, e.g. "bfloat16"), shape (the logical
                                              shape), and when double-quantized nested_blocksize (256),
                                              nested_dtype ("float32") and nested_offset (the float32 mean
                                              subtracted before the second quantization, as a JSON number)

`to_qtensors` turns each such group into one NF4 `QTensor` of the logical shape, made of our self-contained blocks
(absmax as bitsandbytes dequantizes it, then the 32 code bytes copied as they are), and drops the auxiliary keys.
"""

from __future__ import annotations

import json
import math

import torch

from engine.errors import ModelFileError
from kernels.formats import NF4_NESTED_BLOCK, NF4_VALUES, get_format
from kernels.qtensor import QTensor
from kernels.torch_codecs.nf4 import blocks_from_bnb

QUANT_STATE_KEY = ".quant_state.bitsandbytes__"
# Auxiliary tensors of a weight `X.weight`, under `X.weight.` (the quant-state JSON key is added per quant type).
AUX_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BLOCK_SIZE = get_format("NF4").block_size


def _find_groups(tensors: dict) -> dict[str, str]:
    """weight name -> its quant-state key."""
    groups = {}
    for name in tensors:
        head, sep, quant_type = name.rpartition(QUANT_STATE_KEY)
        if sep and head:
            groups[head] = name
    return groups


def _flat(tensor, what: str, dtype: torch.dtype, path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ModelFileError(path, f"bitsandbytes tensor {what}: expected {dtype}, got {got}")
    return tensor.detach().reshape(-1)


def _read_quant_state(tensors: dict, weight: str, key: str, path) -> dict:
    qs = tensors[key]
    try:
        raw = _flat(qs, key, torch.uint8, path)
        state = json.loads(bytes(raw.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"{weight}: corrupt bitsandbytes quant state {key!r}: {e}") from None
    if not isinstance(state, dict):
        raise ModelFileError(path, f"{weight}: corrupt bitsandbytes quant state {key!r}: not a JSON object")
    return state


def _convert(tensors: dict, weight: str, key: str, path) -> tuple[QTensor, list[str]]:
    state = _read_quant_state(tensors, weight, key, path)
    quant_type = state.get("quant_type")
    key_type = key.rpartition(QUANT_STATE_KEY)[2]
    if quant_type != key_type:
        raise ModelFileError(path, f"{weight}: quant state {key!r} says quant_type {quant_type!r}")
    if quant_type != "nf4":
        raise ModelFileError(path, f"{weight}: bitsandbytes quant_type {quant_type!r} is unsupported (only nf4)")
    if state.get("blocksize") != BLOCK_SIZE:
        raise ModelFileError(path, f"{weight}: bitsandbytes blocksize {state.get('blocksize')!r} is unsupported "
                                   f"(only {BLOCK_SIZE})")
    shape = state.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ModelFileError(path, f"{weight}: bad logical shape {shape!r} in its quant state")
    if shape[-1] % BLOCK_SIZE:
        raise ModelFileError(path, f"{weight}{shape}: last dimension is not a multiple of {BLOCK_SIZE}, so NF4 "
                                   f"blocks of the flattened weight do not align with its rows")
    prefix = weight + "."
    present = {s: prefix + s for s in AUX_SUFFIXES if prefix + s in tensors}
    for required in ("absmax", "quant_map"):
        if required not in present:
            raise ModelFileError(path, f"{weight}: bitsandbytes NF4 weight without {prefix + required}")
    nested = "nested_absmax" in present or "nested_quant_map" in present
    numel = math.prod(shape)
    codes = _flat(tensors[weight], weight, torch.uint8, path)
    if codes.numel() != numel // 2:
        raise ModelFileError(path, f"{weight}: {codes.numel()} code bytes for logical shape {shape} "
                                   f"({numel // 2} expected)")
    quant_map = _flat(tensors[present["quant_map"]], present["quant_map"], torch.float32, path)
    code_book = torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_map.shape != code_book.shape or not torch.equal(quant_map.cpu().view(torch.int32),
                                                               code_book.view(torch.int32)):
        raise ModelFileError(path, f"{present['quant_map']}: not the NF4 code book")
    try:
        if nested:
            for required in ("nested_absmax", "nested_quant_map"):
                if required not in present:
                    raise ModelFileError(path, f"{weight}: double-quantized NF4 weight without {prefix + required}")
            if state.get("nested_blocksize") != NF4_NESTED_BLOCK:
                raise ModelFileError(path, f"{weight}: bitsandbytes nested_blocksize {state.get('nested_blocksize')!r}"
                                           f" is unsupported (only {NF4_NESTED_BLOCK})")
            if state.get("nested_dtype", "float32") != "float32":
                raise ModelFileError(path, f"{weight}: nested_dtype {state.get('nested_dtype')!r} is unsupported")
            offset = state.get("nested_offset")
            if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
                raise ModelFileError(path, f"{weight}: bad nested_offset {offset!r} in its quant state")
            blocks = blocks_from_bnb(
                codes,
                quantized_absmax=_flat(tensors[present["absmax"]], present["absmax"], torch.uint8, path),
                nested_absmax=_flat(tensors[present["nested_absmax"]], present["nested_absmax"], torch.float32, path),
                nested_quant_map=_flat(tensors[present["nested_quant_map"]], present["nested_quant_map"],
                                       torch.float32, path),
                offset=offset,  # bitsandbytes: torch.tensor(float(nested_offset)), a float32; so does blocks_from_bnb
            )
        else:
            blocks = blocks_from_bnb(codes, _flat(tensors[present["absmax"]], present["absmax"], torch.float32, path))
    except ValueError as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"{weight}{shape}: inconsistent bitsandbytes NF4 tensors: {e}") from None
    # a new tensor: the absmax of every block (double quantization undone), then its codes
    raw = blocks.reshape(math.prod(shape[:-1]), -1)
    return QTensor(raw, "NF4", tuple(shape)), [key, *present.values()]


def to_qtensors(tensors: dict, path) -> dict:
    """Replace every bitsandbytes NF4 weight group by one NF4 `QTensor`; other tensors are left as they are."""
    groups = _find_groups(tensors)
    if not groups:
        return tensors
    out = dict(tensors)
    for weight, key in groups.items():
        if weight not in tensors:
            raise ModelFileError(path, f"bitsandbytes quant state {key!r} without its weight {weight!r}")
        qtensor, aux = _convert(tensors, weight, key, path)
        out[weight] = qtensor
        for name in aux:
            out.pop(name, None)
    return out
