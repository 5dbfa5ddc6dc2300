"""The planes layout: a quantized row rearranged the way the GPU kernels read it fastest, losslessly.

A row of `nb` blocks in the stored ("blocks") layout interleaves each block's fields (`d | qs | d | qs ...`), so a
block's codes sit at a 34- or 18-byte stride and can only be read a byte at a time. In the planes layout the same
bytes are regrouped field by field:

    row = [field 0 of blocks 0..nb-1 | pad] [field 1 of blocks 0..nb-1 | pad] ...   each plane 16-byte aligned

so the codes of consecutive blocks are contiguous (16-byte vector loads), each scale is a typed, aligned load of its
own, and 4-bit codes are paired in element order (byte j holds element 2j in its low nibble, 2j+1 in its high one),
so a tile of bytes unpacks into consecutive elements with no index arithmetic. Q6_K's 6-bit codes become two planes
of the same sizes as its `ql` and `qh` fields: the low 4 bits paired in element order, the high 2 bits four to a
byte in element order (element 4j in bits 0-1 of byte j). Planes are padded to 16 bytes; for Flux's shapes (K a
multiple of 256) no padding is needed, so the layout takes exactly the stored bytes.

Formats opt in through `Format.codes` (the order of their codes); the other K-quants and IQ4_XS keep the blocks
layout: their packed 6-bit sub-block scales would be decoded per element again. `to_planes` / `to_blocks` are torch gathers that run on whichever device holds the bytes, so a
weight is repacked where it will be used, after it leaves its memory-mapped file.
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


def _pair_codes(codes: torch.Tensor, order: str) -> torch.Tensor:
    """A field of 4-bit codes `(rows, nb, bytes)` in the stored order -> element pairs (low nibble first)."""
    if order == "int8":
        return codes
    if order == "high_first":
        return (codes >> 4) | (codes << 4)
    low, high = codes & 15, codes >> 4  # "halves": elements 0..15 in the low nibbles, 16..31 in the high ones
    values = torch.cat([low, high], dim=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _unpair_codes(pairs: torch.Tensor, order: str) -> torch.Tensor:
    if order == "int8":
        return pairs
    if order == "high_first":
        return (pairs >> 4) | (pairs << 4)
    values = torch.stack([pairs & 15, pairs >> 4], dim=-1).flatten(-2)
    half = values.shape[-1] // 2
    return values[..., :half] | (values[..., half:] << 4)


def _q6_k_codes(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q6_K's `ql` `(rows, nb, 128)` and `qh` `(rows, nb, 64)` -> its codes 0..63 `(rows, nb, 256)` in element order
    (each 128-element half: `ql` bytes 0..63 low nibbles, then their high nibbles; `qh` byte i's bit pairs 0..3 are
    elements i, i + 32, i + 64, i + 96)."""
    rows, nb = ql.shape[:2]
    ql, qh = ql.reshape(rows, nb, 2, 64), qh.reshape(rows, nb, 2, 32)
    low = torch.cat([ql & 15, ql >> 4], dim=-1)
    high = torch.cat([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)
    return (low | (high << 4)).reshape(rows, nb, 256)


def _q6_k_fields(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `_q6_k_codes`."""
    rows, nb = codes.shape[:2]
    halves = codes.reshape(rows, nb, 2, 128)
    ql = (halves[..., :64] & 15) | ((halves[..., 64:] & 15) << 4)
    qh = sum(((halves[..., 32 * s:32 * s + 32] >> 4) & 3) << (2 * s) for s in range(4))
    return ql.reshape(rows, nb, 128), qh.to(torch.uint8).reshape(rows, nb, 64)


def _to_planes_fields(fmt: Format, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each field `(rows, nb, size)` as its plane holds it: the codes in element order, the rest as stored."""
    if fmt.codes == "q6_k":
        codes = _q6_k_codes(fields["ql"], fields["qh"])
        low, high = codes & 15, codes >> 4
        return fields | {"ql": low[..., 0::2] | (low[..., 1::2] << 4),
                         "qh": high[..., 0::4] | (high[..., 1::4] << 2) | (high[..., 2::4] << 4) | (high[..., 3::4] << 6)}
    last = fmt.fields[-1][0]
    return fields | {last: _pair_codes(fields[last], fmt.codes)}


def _to_blocks_fields(fmt: Format, planes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `_to_planes_fields`."""
    if fmt.codes == "q6_k":
        pairs, quads = planes["ql"], planes["qh"]
        low = torch.stack([pairs & 15, pairs >> 4], dim=-1).flatten(-2)
        high = torch.stack([(quads >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).flatten(-2)
        ql, qh = _q6_k_fields(low | (high << 4))
        return planes | {"ql": ql, "qh": qh}
    last = fmt.fields[-1][0]
    return planes | {last: _unpair_codes(planes[last], fmt.codes)}


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
