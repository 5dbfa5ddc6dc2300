"""BASELINE ONLY (benchmarks, never the product): ComfyUI-GGUF's torch dequantization, re-implemented here so that
`python -m bench.codecs` can time it against ours in the same run.

This re-implements the algorithm of city96/ComfyUI-GGUF `dequant.py` (Apache-2.0): the same sequence of torch
operations on the same dtypes per format, so that it costs what theirs costs. Its default configuration
(`dequant_dtype=None`) keeps the fp16 scales in fp16, so the arithmetic runs in fp16 (int codes times an fp16 scale
promote to fp16) and the result is cast to the requested dtype at the end; F16 and F32 are a plain cast. Results are
ggml's values up to fp16 rounding, not bit for bit: the benchmark times it, the tests never use it.
"""

from __future__ import annotations

import torch

from kernels.formats import FORMATS, IQ4_VALUES, QK_K

_IQ4_LEVELS = torch.tensor(IQ4_VALUES, dtype=torch.int8)


def _fields(blocks: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    """Split `(n, block_bytes)` into leading fields of `sizes` bytes and the rest."""
    return torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1)


def _shifts(values, shape, device) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=torch.uint8).reshape(shape)


def _u32(fields: torch.Tensor) -> torch.Tensor:
    b = fields.to(torch.int32)
    return (b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24).unsqueeze(1)


def _u16(fields: torch.Tensor) -> torch.Tensor:
    b = fields.to(torch.int32)
    return (b[:, 0] | b[:, 1] << 8).unsqueeze(1)


def _f16(field: torch.Tensor) -> torch.Tensor:
    return field.view(torch.float16)  # `.to(None)` in theirs: the scale stays fp16


def _nibbles(qs: torch.Tensor, n: int, run: int) -> torch.Tensor:
    """Low then high nibbles of each `run`-byte span, as `(n, -1, 2 * run)`-ordered uint8 (via a broadcast shift)."""
    q = qs.reshape(n, -1, 1, run) >> _shifts([0, 4], (1, 1, 2, 1), qs.device)
    return q & 0x0F


def _fifth_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    bits = _u32(qh).reshape(n, 1) >> torch.arange(32, device=qh.device, dtype=torch.int32).reshape(1, 32)
    return (bits & 1).to(torch.uint8)


def _q8_0(blocks, n):
    d, x = _fields(blocks, 2)
    return _f16(d) * x.view(torch.int8)


def _q5_1(blocks, n):
    d, m, qh, qs = _fields(blocks, 2, 2, 4)
    q = _nibbles(qs, n, 16).reshape(n, -1) | (_fifth_bits(qh, n) << 4)
    return _f16(d) * q + _f16(m)


def _q5_0(blocks, n):
    d, qh, qs = _fields(blocks, 2, 4)
    q = (_nibbles(qs, n, 16).reshape(n, -1) | (_fifth_bits(qh, n) << 4)).to(torch.int8) - 16
    return _f16(d) * q


def _q4_1(blocks, n):
    d, m, qs = _fields(blocks, 2, 2)
    return _f16(d) * _nibbles(qs, n, 16).reshape(n, -1) + _f16(m)


def _q4_0(blocks, n):
    d, qs = _fields(blocks, 2)
    return _f16(d) * (_nibbles(qs, n, 16).reshape(n, -1).to(torch.int8) - 8)


def _scale_min(scales: torch.Tensor, n: int):
    low, mid, high = torch.split(scales.reshape(n, 3, 4), 1, dim=-2)
    sc = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q6_k(blocks, n):
    ql, qh, scales, d = _fields(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    dl = (_f16(d) * scales.view(torch.int8).to(None)).reshape(n, QK_K // 16, 1)
    low = _nibbles(ql, n, 64).reshape(n, -1, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qh.device)) & 0x03).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1)
    return (dl * q).reshape(n, QK_K)


def _q45_k(blocks, n, q):
    d, dmin, scales = _fields(blocks, 2, 2, 12)[:3]
    sc, mn = _scale_min(scales, n)
    dl = (_f16(d) * sc).reshape(n, -1, 1)
    ml = (_f16(dmin) * mn).reshape(n, -1, 1)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(blocks, n):
    qh, qs = _fields(blocks, 16, QK_K // 8)[1:]
    high = ((qh.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), qh.device)) & 0x01).reshape(n, -1, 32)
    return _q45_k(blocks, n, _nibbles(qs, n, 32).reshape(n, -1, 32) | (high << 4))


def _q4_k(blocks, n):
    return _q45_k(blocks, n, _nibbles(_fields(blocks, 16)[1], n, 32).reshape(n, -1, 32))


def _q3_k(blocks, n):
    hmask, qs, scales, d = _fields(blocks, QK_K // 8, QK_K // 4, 12)
    low_scales = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), d.device)).reshape(n, 16)
    high_scales = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), d.device)).reshape(n, 16)
    sc = ((low_scales & 0x0F) | ((high_scales & 0x03) << 4)).to(torch.int8) - 32
    dl = (_f16(d) * sc).reshape(n, 16, 1)
    low = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), d.device)).reshape(n, 16, QK_K // 16) & 3
    high = hmask.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), d.device)
    high = (high.reshape(n, 16, QK_K // 16) & 1) ^ 1
    return (dl * (low.to(torch.int8) - (high << 2).to(torch.int8))).reshape(n, QK_K)


def _q2_k(blocks, n):
    scales, qs, d, dmin = _fields(blocks, QK_K // 16, QK_K // 4, 2)
    dl = (_f16(d) * (scales & 0xF)).reshape(n, QK_K // 16, 1)
    ml = (_f16(dmin) * (scales >> 4)).reshape(n, QK_K // 16, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), d.device)) & 3).reshape(n, QK_K // 16, 16)
    return (dl * q - ml).reshape(n, -1)


def _iq4_levels(codes: torch.Tensor) -> torch.Tensor:
    """Code-book lookup as theirs does it: a gather from the 16 levels expanded over every element."""
    levels = _IQ4_LEVELS.to(codes.device).expand(*codes.shape[:-1], 16)
    return torch.gather(levels, dim=-1, index=codes.to(torch.int64))


def _iq4_nl(blocks, n):
    d, qs = _fields(blocks, 2)
    return _f16(d) * _iq4_levels(_nibbles(qs, n, 16).reshape(n, -1, 1)).reshape(n, -1)


def _iq4_xs(blocks, n):
    d, scales_h, scales_l, qs = _fields(blocks, 2, 2, QK_K // 64)
    low = (scales_l.reshape(n, -1, 1) >> _shifts([0, 4], (1, 1, 2), d.device)).reshape(n, -1) & 0x0F
    high_shifts = _shifts([2 * i for i in range(QK_K // 32)], (1, -1, 1), d.device)
    high = (_u16(scales_h).reshape(n, -1, 1) >> high_shifts).reshape(n, -1).to(torch.uint8) & 0x03
    dl = (_f16(d) * ((low | (high << 4)).to(torch.int8) - 32).to(None)).reshape(n, -1, 1)
    codes = (qs.reshape(n, -1, 1, 16) >> _shifts([0, 4], (1, 1, 2, 1), d.device)).reshape(n, -1, 32, 1) & 0x0F
    return (dl * _iq4_levels(codes).reshape(n, -1, 32)).reshape(n, -1)


def _bf16(blocks, n):
    return (blocks.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


_BLOCK_DECODERS = {"Q8_0": _q8_0, "Q5_1": _q5_1, "Q5_0": _q5_0, "Q4_1": _q4_1, "Q4_0": _q4_0, "Q6_K": _q6_k,
                   "Q5_K": _q5_k, "Q4_K": _q4_k, "Q3_K": _q3_k, "Q2_K": _q2_k, "IQ4_NL": _iq4_nl,
                   "IQ4_XS": _iq4_xs, "BF16": _bf16}
TORCH_COMPATIBLE = {"F32": torch.float32, "F16": torch.float16}
FORMATS_COVERED = tuple(TORCH_COMPATIBLE) + tuple(_BLOCK_DECODERS)


def dequantize(raw: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 `(rows, row_bytes)` -> `(rows, n)` in `dtype`, as ComfyUI-GGUF's `dequantize_tensor(tensor, dtype)` with
    its default configuration."""
    f = FORMATS[fmt]
    if fmt in TORCH_COMPATIBLE:
        return raw.view(TORCH_COMPATIBLE[fmt]).to(dtype)
    blocks = raw.reshape(-1, f.block_bytes)
    values = _BLOCK_DECODERS[fmt](blocks, blocks.shape[0])
    return values.reshape(raw.shape[0], -1).to(dtype)
