"""Pieces shared by the torch codecs: byte reinterpretation, fp16 fields, nibble and bit-plane packing, and division
rounded exactly as the numpy reference's (`kernels/reference/common.py`).

Bit operations stay on uint8, or on signed int16/int32 where wider words are needed: torch has no unsigned 16/32-bit
bit operations on every device.
"""

from __future__ import annotations

import torch


def view_bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the little-endian uint8 bytes along the last axis of `data` as `dtype`, without copying when
    torch allows it: a view to a wider dtype needs a contiguous last axis and every stride and the storage offset
    to be whole elements. Otherwise (blocks whose size is not a multiple of the width, a buffer sliced at an odd
    byte) the bytes are copied first."""
    width = dtype.itemsize
    aligned = (data.stride(-1) == 1 and data.storage_offset() % width == 0
               and all(stride % width == 0 for stride in data.stride()[:-1]))
    return (data if aligned else data.clone(memory_format=torch.contiguous_format)).view(dtype)


def read_f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian fp16 at byte `offset` of every block, as float32 `(nblocks, 1)`."""
    return view_bytes_as(blocks[:, offset:offset + 2], torch.float16).float()


def f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 `(nblocks, 1)` -> its fp16 (round to nearest even, as GGML_FP32_TO_FP16) as 2 bytes `(nblocks, 2)`."""
    raw = torch.empty((values.numel(), 2), dtype=torch.uint8, device=values.device)
    raw.view(torch.float16).copy_(values.reshape(-1, 1))
    return raw


def divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """`x / divisor`, correctly rounded like numpy's division.

    On CUDA, torch turns division by a Python number into multiplication by its reciprocal, which can be one ulp
    off (for 127, 15, 31...); a divisor held in a tensor on the same device is divided exactly everywhere.
    """
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def f16_round(values: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 -> float32, the value a stored scale has when it is read back."""
    return values.to(torch.float16).to(torch.float32)


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's `nearest_int` bit trick, exactly (also for the huge values it wraps), as int32."""
    shifted = (values + 12582912.0).view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def as_float(values: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`values` (integer codes, or floats of another width) as float32: written into `out` (as many elements, the
    result the dispatcher hands out or its work buffer) when given, else a new tensor; shaped like `values`."""
    return values.float() if out is None else out.view(values.shape).copy_(values)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of `(n, B)`: largest |x| and the signed value where it first occurs (torch's argmax is the first)."""
    signed = x.gather(0, x.abs().argmax(dim=0, keepdim=True))[0]
    return signed.abs(), signed


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `(..., m)` -> `(..., 2m)`: the low nibbles of all bytes, then the high nibbles (ggml's order)."""
    return torch.cat(bit_fields(packed, 4), dim=-1)


def lookup(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`table[codes]` for a 1-D `table` and uint8 `codes`, shaped like `codes` (or written into contiguous `out` of
    as many elements).

    `index_select` with int32 indices: several times faster on the CPU than indexing with int64 (`table[codes.long()]`
    writes and reads 8-byte indices and takes the general advanced-indexing path). A table of wider words (several
    values per code) is best looked up as one integer word per code: index_select copies rows element by element."""
    index = codes.reshape(-1).to(torch.int32)
    if out is None:
        return torch.index_select(table, 0, index).view(codes.shape)
    return torch.index_select(table, 0, index, out=out.view(-1)).view(out.shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_nibbles`: uint8 `(..., 2m)` codes < 16 -> uint8 `(..., m)`."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


# A block field of every block is a strided view (rows of 4 to 128 bytes at the block's stride): decoders copy it to
# contiguous bytes before splitting its bit fields, as byte operations and torch.stack on the strided view run
# several times slower on the CPU (row by row).

def bit_fields(packed: torch.Tensor, bits: int, at: int = 0) -> list[torch.Tensor]:
    """The `8 // bits` fields of every byte of uint8 `packed`, field k (bits `k * bits` and up) as the k-th uint8
    tensor shaped like `packed`, moved to bit `at` (`at=4`: a code's 5th and 6th bits, ready to be or-ed onto its
    nibble). One shift by a Python number per field: shifts by a broadcast tensor of shifts are several times slower.
    """
    mask = ((1 << bits) - 1) << at
    fields = []
    for low_bit in range(0, 8, bits):
        shift = low_bit - at
        moved = packed >> shift if shift > 0 else packed << -shift if shift < 0 else packed
        fields.append(moved & mask)
    return fields


def interleave_runs(fields: list[torch.Tensor], run: int) -> torch.Tensor:
    """Element codes from the fields of the same bytes, uint8 `(nb, m)` each (`bit_fields`): every span of `run`
    bytes holds `run` elements in field 0, then `run` in field 1, ... -> `(nb, len(fields) * m)`."""
    nb = fields[0].shape[0]
    return torch.stack([field.reshape(nb, -1, run) for field in fields], dim=2).reshape(nb, -1)


def nibble_codes(blocks: torch.Tensor, start: int, stop: int, run: int) -> torch.Tensor:
    """The element codes of the nibbles in bytes `start:stop` of every block, `(nblocks, 2 * (stop - start))` uint8:
    each span of `run` bytes holds `run` elements in its low nibbles, then `run` in its high nibbles."""
    return interleave_runs(bit_fields(blocks[:, start:stop].contiguous(), 4), run)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 `(..., m)` holding `8 // bits` fields per byte -> `(..., 8 // bits, m)`: field k of every byte in row k."""
    return torch.stack(bit_fields(packed, bits), dim=-2)


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `unpack_bits`: uint8 `(..., 8 // bits, m)` fields < 2**bits -> uint8 `(..., m)`."""
    packed = fields[..., 0, :].clone()
    for k in range(1, fields.shape[-2]):
        packed |= fields[..., k, :] << (k * bits)
    return packed
