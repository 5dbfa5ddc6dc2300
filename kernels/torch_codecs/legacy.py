"""ggml's original 32-element block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (layouts in `kernels/reference/legacy.py`).

Results agree with the reference bit for bit: every float32 operation that rounds is the reference's, in its order.
Exact steps take cheaper routes: a code's bias is removed on narrow integers before the one conversion to float32,
max |x| comes from the max and the min instead of an |x| copy, temporaries are updated in place.
"""

from __future__ import annotations

import torch

from kernels import state
from kernels.torch_codecs.common import (
    as_float, divide, f16_bytes, lookup, nibble_codes, pack_bits, pack_nibbles, read_f16,
)


def _fifth_bit_bytes(device: torch.device) -> torch.Tensor:
    """`(256,)` int64 whose byte k is 16 times bit k of the index: a byte of fifth bits as its 8 elements' 16s."""
    return state.constants("legacy_fifth_bits", device, lambda d: torch.tensor(
        [sum(((byte >> k) & 1) << (8 * k + 4) for k in range(8)) for byte in range(256)], dtype=torch.int64,
        device=d))


def _high_bits(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The 32 fifth bits stored as a little-endian u32 at `offset`, as `(nblocks, 32)` values 0 or 16: element e is
    bit e % 8 of byte e // 8, so each byte's 8 elements are one 8-byte word of a table lookup."""
    return lookup(_fifth_bit_bytes(blocks.device), blocks[:, offset:offset + 4]).view(torch.uint8)


def _pack_high_bits(codes: torch.Tensor) -> torch.Tensor:
    return pack_bits((codes >> 4).reshape(-1, 4, 8, 1), 1).reshape(-1, 4)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1/d : 0` in float32."""
    return torch.where(d == 0, 0.0, d.reciprocal())


def _min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, `(nblocks, 1)` each: the first extreme elements, as ggml's `if (v < min)` / `if (v > max)` scans
    keep them (torch's min/max with a dim report first occurrences), which fixes the signs of zero extremes."""
    return x.min(dim=-1, keepdim=True).values, x.max(dim=-1, keepdim=True).values


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value with the largest magnitude (first one on ties), `(nblocks, 1)`: the block's max or its min, whichever
    is larger in magnitude or, on a tie, comes first (torch.max/min report first occurrences). Avoids an |x| copy."""
    hi, hi_at = x.max(dim=-1, keepdim=True)
    lo, lo_at = x.min(dim=-1, keepdim=True)
    at = torch.where((hi > -lo) | ((hi == -lo) & (hi_at < lo_at)), hi_at, lo_at)
    return x.gather(-1, at)  # the element itself: a block of zeros keeps its first zero's sign


def _c_cast(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """C's `(int8_t)v` / `(uint8_t)v` as the reference's `_c_byte_cast` defines it, for the values quantizers meet;
    overwrites `v`.

    The dispatcher passes only finite input, so `v` is a code within a byte's range, where torch's cast truncates as
    C's does, or, in a block whose `1/d` is inf (float32 subnormal input) or whose range exceeds float32, inf or NaN.
    C's cast makes those INT32_MIN, whose low byte is 0; torch's cast of them is undefined (CPU and CUDA differ).
    """
    return v.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).to(dtype)


def _codes(scaled: torch.Tensor, offset: float, qmax: int) -> torch.Tensor:
    """ggml's `MIN(qmax, (int8_t)(v + offset))`; overwrites `scaled`."""
    return _c_cast(scaled.add_(offset), torch.int8).clamp_(max=qmax).view(torch.uint8)


def _dequantize_symmetric(d: torch.Tensor, q: torch.Tensor, bias: int, out: torch.Tensor | None) -> torch.Tensor:
    """`(q - bias) * d` for uint8 codes `q` (see `as_float` for `out`)."""
    return as_float(q.view(torch.int8).sub_(bias), out).mul_(d)  # codes < 128: the same values as int8


def _dequantize_affine(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`q * d + m` for uint8 codes `q` (see `as_float` for `out`). (Where both terms are NaN, torch's add returns m's
    NaN and numpy's the first term's: only NaN payloads can differ.)"""
    return as_float(q, out).mul_(d).add_(m)


def dequantize_q4_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _dequantize_symmetric(read_f16(blocks, 0), nibble_codes(blocks, 2, 18, 16), 8, out)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    d = divide(_signed_absmax(x), -8)
    q = _codes(x * _inverse(d), 8.5, 15)
    return torch.cat([f16_bytes(d), pack_nibbles(q)], dim=-1)


def dequantize_q4_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _dequantize_affine(read_f16(blocks, 0), read_f16(blocks, 2), nibble_codes(blocks, 4, 20, 16), out)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = _min_max(x)
    d = divide(hi - lo, 15)
    q = _codes((x - lo).mul_(_inverse(d)), 0.5, 15)
    return torch.cat([f16_bytes(d), f16_bytes(lo), pack_nibbles(q)], dim=-1)


def dequantize_q5_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = nibble_codes(blocks, 6, 22, 16).bitwise_or_(_high_bits(blocks, 2))
    return _dequantize_symmetric(read_f16(blocks, 0), q, 16, out)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    d = divide(_signed_absmax(x), -16)
    q = _codes(x * _inverse(d), 16.5, 31)
    return torch.cat([f16_bytes(d), _pack_high_bits(q), pack_nibbles(q & 0x0F)], dim=-1)


def dequantize_q5_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = nibble_codes(blocks, 8, 24, 16).bitwise_or_(_high_bits(blocks, 4))
    return _dequantize_affine(read_f16(blocks, 0), read_f16(blocks, 2), q, out)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = _min_max(x)
    d = divide(hi - lo, 31)
    # ggml casts to uint8 without a cap: (max - min) * (1/d) + 0.5 never reaches 32.
    q = _c_cast((x - lo).mul_(_inverse(d)).add_(0.5), torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(lo), _pack_high_bits(q), pack_nibbles(q & 0x0F)], dim=-1)


def dequantize_q8_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return as_float(blocks[:, 2:].view(torch.int8), out).mul_(read_f16(blocks, 0))


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    lo, hi = _min_max(x)
    amax = torch.maximum(hi, -lo).abs_()  # max |x| without an |x| copy of the input; abs_ turns -0.0 into +0.0
    d = divide(amax, 127)
    # C roundf (halves away from zero, unlike torch.round) of x / d; x / d has x's sign, as 1 / d >= 0
    q = (x * _inverse(d)).abs_().add_(0.5).floor_().copysign_(x)
    return torch.cat([f16_bytes(d), _c_cast(q, torch.int8).view(torch.uint8)], dim=-1)
