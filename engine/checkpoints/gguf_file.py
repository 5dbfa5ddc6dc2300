"""GGUF files: a strict, bounded walk over the header, then the gguf package's reader over a memory map.

The walk exists because the reader trusts the header: an absurd array length makes it loop for as long as the count
says, and dimension products can overflow. Every count and size is checked against the bytes that are actually there
before anything is read or allocated.

Layout (little-endian): magic "GGUF" | version u32 (2 or 3) | tensor count u64 | kv count u64 | kv pairs | tensor
infos | padding to `general.alignment` (default 32) | tensor data. A kv pair is a string key, a u32 value type and the
value; strings are a u64 length and UTF-8 bytes; arrays are an item type u32, a u64 count and the items. A tensor info
is a name, n_dims u32, n_dims u64 dims (innermost first), a u32 GGML type and a u64 offset into the data section.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from engine.errors import ModelFileError
from kernels.formats import format_from_ggml_type
from kernels.qtensor import QTensor

MAGIC = b"GGUF"
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
STRING, ARRAY = 8, 9
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 48
MAX_NAME_BYTES = 1 << 16


class _Cursor:
    def __init__(self, path: Path, data: np.ndarray):
        self.path, self.data, self.pos = path, data, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelFileError(self.path, f"truncated GGUF header: {what} needs {n} bytes at offset {self.pos}, "
                                            f"the file has {len(self.data)}")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.unpack("<Q", what)
        if limit is not None and length > limit:
            raise ModelFileError(self.path, f"{what} is {length} bytes long (limit {limit})")
        self.need(length, what)
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(self.path, f"{what} is not valid UTF-8") from None

    def skip_value(self, value_type: int, what: str, depth: int = 0):
        """Skip one value, returning it when it is a scalar or a string (arrays are not needed)."""
        if value_type in SCALAR_SIZES:
            fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}[value_type]
            return self.unpack(fmt, what)
        if value_type == STRING:
            return self.string(what)
        if value_type == ARRAY and depth < 2:
            item_type, count = self.unpack("<IQ", f"{what} array header")
            if item_type in SCALAR_SIZES:
                self.need(count * SCALAR_SIZES[item_type], f"{what} array of {count} items")
                self.pos += count * SCALAR_SIZES[item_type]
                return None
            if item_type not in (STRING, ARRAY):
                raise ModelFileError(self.path, f"{what}: unknown GGUF array item type {item_type}")
            self.need(count * 8, f"{what} array of {count} items")  # every item takes at least 8 bytes
            for _ in range(count):
                self.skip_value(item_type, what, depth + 1)
            return None
        raise ModelFileError(self.path, f"{what}: unknown GGUF value type {value_type}")


def _walk_header(path: Path, data: np.ndarray) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """Validate the header; returns (scalar metadata, tensor infos (name, logical shape, type id, offset), data start)."""
    if not len(data):
        raise ModelFileError(path, f"empty file (0 bytes); a GGUF file starts with the magic {MAGIC!r}")
    cur = _Cursor(path, data)
    cur.need(4, "magic")
    if bytes(data[:4]) != MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.unpack("<QQ", "tensor and metadata counts")
    remaining = len(data) - cur.pos
    if n_kv > remaining // 12 or n_tensors > remaining // 24:
        raise ModelFileError(path, f"absurd GGUF counts ({n_tensors} tensors, {n_kv} metadata entries) for a "
                                   f"{len(data)}-byte file")
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_NAME_BYTES)
        value_type = cur.unpack("<I", f"type of {key}")
        if key in metadata:
            raise ModelFileError(path, f"duplicate metadata key {key!r}")
        metadata[key] = cur.skip_value(value_type, f"metadata {key!r}")
    infos, names = [], set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", MAX_NAME_BYTES)
        if name in names:
            raise ModelFileError(path, f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.unpack("<I", f"dims of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(path, f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} supported)")
        dims = tuple(cur.unpack(f"<{n_dims}Q", f"dims of {name}") if n_dims > 1 else (cur.unpack("<Q", name),))
        if min(dims) < 1 or math.prod(dims) > MAX_ELEMENTS:
            raise ModelFileError(path, f"tensor {name!r} has impossible dimensions {list(dims)}")
        type_id, offset = cur.unpack("<IQ", f"type and offset of {name}")
        infos.append((name, tuple(reversed(dims)), type_id, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ModelFileError(path, f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    for name, shape, type_id, offset in infos:
        try:
            fmt = format_from_ggml_type(type_id)
        except ValueError as e:
            raise ModelFileError(path, f"tensor {name!r}: {e}") from None
        if shape[-1] % fmt.block_size:
            raise ModelFileError(path, f"tensor {name!r} {fmt.name}{list(shape)}: row of {shape[-1]} is not a whole "
                                       f"number of {fmt.block_size}-element blocks")
        n_bytes = math.prod(shape) // fmt.block_size * fmt.block_bytes
        if offset % alignment or data_start + offset + n_bytes > len(data):
            raise ModelFileError(path, f"tensor {name!r} data ({n_bytes} bytes at offset {offset}) lies outside the "
                                       f"file or is misaligned")
    return metadata, infos, data_start


def read_gguf(path: Path) -> tuple[dict[str, torch.Tensor | QTensor], dict]:
    """Memory-map a GGUF file: returns (tensors by stored name, scalar metadata). Nothing is copied or decoded;
    quantized tensors become `QTensor`s over the mapping, F32/F16/BF16 plain tensors."""
    from gguf import GGUFReader

    # numpy cannot map an empty file; as an empty array it fails the header walk's first check like a short one
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.empty(0, np.uint8)
    metadata, infos, data_start = _walk_header(path, data)
    try:
        reader = GGUFReader(path, "c")  # copy-on-write: tensors are writable without touching the file
    except Exception as e:  # the header walk accepted it, so this is a reader limitation: report, don't crash
        raise ModelFileError(path, f"the gguf reader rejected the file: {e}") from None
    tensors = {}
    for info, t in zip(infos, reader.tensors):
        name, shape, type_id, _ = info
        fmt = format_from_ggml_type(type_id)
        raw = torch.from_numpy(np.asarray(t.data).view(np.uint8).reshape(-1))
        if fmt.is_quantized:
            tensors[name] = QTensor(raw.view(math.prod(shape[:-1]), -1), fmt.name, shape)
        else:
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name]
            tensors[name] = raw.view(dtype).view(shape)
    return tensors, metadata

