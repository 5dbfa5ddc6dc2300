"""The planes layout: a quantized row rearranged the way the GPU kernels read it fastest, losslessly.

A row of `nb` blocks in the stored ("blocks") layout interleaves each block's fields (`d | qs | d | qs ...`), so a
block's codes sit at a 34- or 18-byte stride and can only be read a byte at a time. In the planes layout the same
bytes are regrouped field by field:

    row = [field 0 of blocks 0..nb-1 | pad] [field 1 of blocks 0..nb-1 | pad] ...   each plane 16-byte aligned

so the codes of consecutive blocks are contiguous (16-byte vector loads), each scale is a typed, aligned load of its
own, and 4-bit codes are paired in element order (byte j holds element 2j in its low nibble, 2j+1 in its high one),
so a tile of bytes unpacks into consecutive elements with no index arithmetic. The K-quants' code fields (ggml's
nibble runs, 2-bit crumbs, high-bit planes: `CODE_FIELDS`) become planes of the same sizes holding the same bits in
element order, 8 // bits codes a byte, the first in the lowest bits (Q3_K's third bits in the order its decoders
merge them: `PLANE_ORDERS`); their (and IQ4_XS's) sub-block scales stay as
stored, decoded once per sub-block by the kernel. Planes are padded to 16 bytes: for Flux's shapes (K a multiple of
256) the legacy formats and NF4 take exactly the stored bytes, the K-quants and IQ4_XS up to 1.6% more at K = 3072
(their 2-byte super-block fields: 24 bytes a row, padded to 32) and none at K = 12288.

Formats opt in through `Format.codes` (the order of their codes): every block-quantized one does. `to_planes` /
`to_blocks` are torch gathers that run on whichever device holds the bytes, so a weight is repacked where it will be
used, after it leaves its memory-mapped file.
"""

from __future__ import annotations

import torch

from kernels.formats import Format, get_format

PLANE_ALIGN = 16
LAYOUTS = ("blocks", "planes")


def has_planes(fmt: Format | str) -> bool:
    return (get_format(fmt) if isinstance(fmt, str) else fmt).codes is not None


def _require_planes(fmt: Format) -> None:
    if fmt.codes is None:
        raise ValueError(f"{fmt.name} has no planes layout; formats with one: "
                         + ", ".join(f.name for f in _planes_formats()))


def _planes_formats() -> list[Format]:
    from kernels.formats import FORMATS

    return [f for f in FORMATS.values() if f.codes is not None]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // PLANE_ALIGN) * PLANE_ALIGN


def plane_offsets(fmt: Format, K: int) -> dict[str, int]:
    """Byte offset of each field's plane within a row of K elements."""
    _require_planes(fmt)
    nb = K // fmt.block_size
    offsets, position = {}, 0
    for name, size in fmt.fields:
        offsets[name] = position
        position += _aligned(nb * size)
    return offsets


def planes_row_bytes(fmt: Format, K: int) -> int:
    _require_planes(fmt)
    fmt.row_bytes(K)  # K must be a whole number of blocks
    return sum(_aligned(K // fmt.block_size * size) for _, size in fmt.fields)


# Each planes format's code fields, as (bits, run): `bits`-wide codes, 8 // bits a byte; in every span of `run` bytes,
# field k of each byte (bits k * bits and up) holds elements k * run .. (k + 1) * run - 1 of the span: ggml's nibble
# runs (legacy blocks: one run of 16 bytes), 2-bit crumbs and high-bit planes. Run 0: bitsandbytes' order, two codes
# a byte with the first in the high nibble.
CODE_FIELDS = {
    "int8": {"qs": (8, 32)},
    "halves": {"qs": (4, 16)},
    "high_first": {"qs": (4, 0)},
    "q6_k": {"ql": (4, 64), "qh": (2, 32)},
    "q5_k": {"qh": (1, 32), "qs": (4, 32)},
    "q4_k": {"qs": (4, 32)},
    "q3_k": {"hmask": (1, 32), "qs": (2, 32)},
    "q2_k": {"qs": (2, 32)},
    "iq4_xs": {"qs": (4, 16)},
}


# Code fields whose plane holds them in another order than the elements': within each 32, position p (bit p of a
# little-endian 32-bit word) holds element PLANE_ORDERS[...][p]. Q3_K's third bits are spread a nibble to a byte
# (bit 8b + 4h + i: element 16h + 4b + i), as its decoders merge them into bytes (bit i of byte b: element 4b + i
# of each 16), where spreading 16 bits at run time took 6 instructions a 16 elements.
NIBBLES_TO_BYTES = tuple(16 * ((p % 8) // 4) + 4 * (p // 8) + p % 4 for p in range(32))
PLANE_ORDERS = {("q3_k", "hmask"): NIBBLES_TO_BYTES}


def _reordered(codes: torch.Tensor, order) -> torch.Tensor:
    """Codes `(rows, nb, elements)`: position p of each `len(order)` takes the code at `order[p]`."""
    spans = codes.reshape(*codes.shape[:-1], -1, len(order))
    return spans[..., list(order)].flatten(-2)


def _stored_to_elements(field: torch.Tensor, bits: int, run: int) -> torch.Tensor:
    """A code field `(rows, nb, bytes)` as stored -> its codes `(rows, nb, elements)` in element order."""
    if run == 0:
        return torch.stack([field >> 4, field & 15], dim=-1).flatten(-2)
    spans = field.reshape(*field.shape[:-1], -1, run)
    return torch.stack([(spans >> (bits * k)) & ((1 << bits) - 1) for k in range(8 // bits)], dim=-2).flatten(-3)


def _elements_to_stored(codes: torch.Tensor, bits: int, run: int) -> torch.Tensor:
    if run == 0:
        return (codes[..., 0::2] << 4) | codes[..., 1::2]
    fields = codes.reshape(*codes.shape[:-1], -1, 8 // bits, run)
    return _or_shifted(fields.unbind(-2), bits).flatten(-2)


def _elements_to_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in element order -> bytes of 8 // bits consecutive codes each, the first in the lowest bits."""
    return _or_shifted(codes.reshape(*codes.shape[:-1], -1, 8 // bits).unbind(-1), bits)


def _plane_to_elements(plane: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.stack([(plane >> (bits * k)) & ((1 << bits) - 1) for k in range(8 // bits)], dim=-1).flatten(-2)


def _or_shifted(fields, bits: int) -> torch.Tensor:
    packed = fields[0].clone()
    for k, field in enumerate(fields[1:], start=1):
        packed |= field << (bits * k)
    return packed


def _to_planes_fields(fmt: Format, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each field `(rows, nb, size)` as its plane holds it: codes in element order (or `PLANE_ORDERS`'), the rest as
    stored."""
    planes = {}
    for name, (bits, run) in CODE_FIELDS[fmt.codes].items():
        codes = _stored_to_elements(fields[name], bits, run)
        order = PLANE_ORDERS.get((fmt.codes, name))
        planes[name] = _elements_to_plane(codes if order is None else _reordered(codes, order), bits)
    return fields | planes


def _to_blocks_fields(fmt: Format, planes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `_to_planes_fields`."""
    fields = {}
    for name, (bits, run) in CODE_FIELDS[fmt.codes].items():
        codes = _plane_to_elements(planes[name], bits)
        order = PLANE_ORDERS.get((fmt.codes, name))
        if order is not None:
            codes = _reordered(codes, sorted(range(len(order)), key=order.__getitem__))
        fields[name] = _elements_to_stored(codes, bits, run)
    return planes | fields


def to_planes(raw: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """Blocks-layout bytes `(rows, row_bytes)` -> planes-layout bytes `(rows, planes_row_bytes)`, on raw's device."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    _require_planes(fmt)
    rows, K = raw.shape[0], fmt.elements(raw.shape[1])
    blocks = raw.view(rows, K // fmt.block_size, fmt.block_bytes)
    out = torch.zeros((rows, planes_row_bytes(fmt, K)), dtype=torch.uint8, device=raw.device)
    fields = _to_planes_fields(fmt, {name: blocks[:, :, fmt.offset(name):fmt.offset(name) + size]
                                     for name, size in fmt.fields})
    for name, offset in plane_offsets(fmt, K).items():
        field = fields[name]
        out[:, offset:offset + field.shape[1] * field.shape[2]] = field.reshape(rows, -1)
    return out


def to_blocks(planes: torch.Tensor, fmt: Format | str, K: int) -> torch.Tensor:
    """The inverse of `to_planes` for rows of K elements."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    _require_planes(fmt)
    rows, nb = planes.shape[0], K // fmt.block_size
    if planes.shape[1] != planes_row_bytes(fmt, K):
        raise ValueError(f"{fmt.name} planes of {K} elements take {planes_row_bytes(fmt, K)} bytes a row, got "
                         f"{planes.shape[1]}")
    blocks = torch.empty((rows, nb, fmt.block_bytes), dtype=torch.uint8, device=planes.device)
    sizes = dict(fmt.fields)
    fields = _to_blocks_fields(fmt, {name: planes[:, offset:offset + nb * sizes[name]].reshape(rows, nb, sizes[name])
                                     for name, offset in plane_offsets(fmt, K).items()})
    for name, size in fmt.fields:
        blocks[:, :, fmt.offset(name):fmt.offset(name) + size] = fields[name]
    return blocks.view(rows, nb * fmt.block_bytes)
