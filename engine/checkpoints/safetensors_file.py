"""safetensors files read over a memory map: the header is parsed and checked here, tensors are views of the map.

Layout: u64 little-endian header length N | N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {str: str}} | data; offsets are relative to the data start.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from engine.errors import ModelFileError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20


def _parse_header(path: Path, size: int, header_bytes: bytes) -> tuple[dict, dict]:
    def no_duplicates(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ModelFileError(path, f"duplicate names in safetensors header: {sorted(k for k in set(keys) if keys.count(k) > 1)[:3]}")
        return dict(pairs)

    try:
        header = json.loads(header_bytes, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(path, f"corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(path, "corrupt safetensors header: __metadata__ is not an object")
    entries, spans = {}, []
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(d, int) and 0 <= d for d in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(path, f"corrupt or unsupported safetensors entry {name!r}: {entry!r}"[:300]) from None
        if end - begin != math.prod(shape) * dtype.itemsize or end > size:
            raise ModelFileError(path, f"tensor {name!r} {entry['dtype']}{list(shape)}: its {end - begin} bytes at "
                                       f"{begin} do not match its shape or lie past the end of the file")
        entries[name] = (dtype, shape, begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ModelFileError(path, f"tensors {a!r} and {b!r} overlap")
    return entries, metadata


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors by stored name (views of a copy-on-write map of the file) and the header's `__metadata__`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(path, f"truncated: {size} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ModelFileError(path, f"not a safetensors file, or truncated: header length {header_len} for a "
                                       f"{size}-byte file")
        header_bytes = f.read(header_len)
    data_start = 8 + header_len
    entries, metadata = _parse_header(path, size - data_start, header_bytes)
    if not entries:
        return {}, metadata
    data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=data_start))
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = data[begin:end]
        if begin % dtype.itemsize:  # a wider view needs an aligned start; rare, and then one tensor is copied
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
    return tensors, metadata
