"""ggml's K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256-element super-blocks (layouts and element order in
`kernels/reference/kquants.py`).

Results agree with the reference bit for bit: every float32 operation is the reference's, in its order
(`dl = d * sc`, then `dl * q - ml`); exact integer steps run on narrow integers before the one conversion to float32.

The quantizers are written for throughput while staying byte-identical to the reference: codes stay float32 during
the scale searches, large intermediates live in buffers reused across search steps, sums are explicit row-by-row
adds (ggml's sequential float32 order, `sequential_sums`), and every divisor is a tensor (see `divide`).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.formats import QK_K
from kernels.torch_codecs.common import (
    as_float, bit_fields, f16_bytes, f16_round, first_absmax, interleave_runs, nearest_int, nibble_codes, pack_bits,
    pack_nibbles, read_f16, unpack_bits, unpack_nibbles,
)

GROUP_MAX_EPS = 1e-15


# ------------------------------------------------------------------------------------------------ dequantizers
# Bit planes: element order in the reference's module docstring; 5th/6th code bits come out of `bit_fields` already
# shifted to bit 4, Q3_K's 3rd bit to bit 2.

def _crumb_codes(blocks: torch.Tensor, start: int, at: int = 0) -> torch.Tensor:
    """2-bit plane of 64 bytes at `start` -> codes `(nb, 256)`, moved to bit `at`: half h, run r, element l is bits
    2r of byte 32h + l."""
    return interleave_runs(bit_fields(blocks[:, start:start + QK_K // 4].contiguous(), 2, at), 32)


def _high_bit_codes(blocks: torch.Tensor, start: int, at: int) -> torch.Tensor:
    """1-bit plane of 32 bytes at `start` -> `(nb, 256)`, each bit moved to bit `at`: element e is bit e // 32 of
    byte e % 32."""
    return interleave_runs(bit_fields(blocks[:, start:start + 32].contiguous(), 1, at), 32)


def _unpack_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's `get_scale_min_k4` for all 8 sub-blocks of Q4_K / Q5_K: 12 bytes -> (sc, m), each `(nb, 8)` in 0..63
    (bit layout in the reference's `_unpack_scale_min`)."""
    low, mid, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([low & 63, (high & 0x0F) | ((low >> 6) << 4)], dim=-1)
    m = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc, m


def _unpack_q3_scales(scales: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes -> 16 scales in -32..31 as int8 (bit layout in the reference's `_unpack_q3_scales`)."""
    low = unpack_nibbles(scales[:, :8])
    high = unpack_bits(scales[:, 8:12], 2).reshape(-1, 16)
    return (low | (high << 4)).view(torch.int8) - 32


def _sub_block_scales(d: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """`d * code` for the integer sub-block scale (or min) codes `(nb, n_sub)`, as `(nb, n_sub, 1)` float32."""
    return (d * codes.float())[..., None]


def _scale_codes(q: torch.Tensor, dl: torch.Tensor, ml: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """`dl * q - ml` (or `dl * q`) for integer codes `q` `(nb, 256)` and per-sub-block `dl`, `ml` `(nb, n_sub, 1)`
    (see `as_float` for `out`). (Where both terms are NaN, torch's sub returns ml's NaN and numpy's the first
    term's: only NaN payloads differ.)"""
    nb, n_sub = dl.shape[:2]
    values = as_float(q.view(nb, n_sub, QK_K // n_sub), out).mul_(dl)
    if ml is not None:
        values.sub_(ml)
    return values.view(nb, QK_K)


def dequantize_q2_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    scales = blocks[:, :16]
    d, dmin = read_f16(blocks, 80), read_f16(blocks, 82)
    return _scale_codes(_crumb_codes(blocks, 16), _sub_block_scales(d, scales & 0x0F),
                        _sub_block_scales(dmin, scales >> 4), out)


def dequantize_q3_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # low | high << 2, less 4: a clear high bit means "minus 4"
    q = _crumb_codes(blocks, 32).bitwise_or_(_high_bit_codes(blocks, 0, 2)).view(torch.int8).sub_(4)
    dl = _sub_block_scales(read_f16(blocks, 108), _unpack_q3_scales(blocks[:, 96:108]))
    return _scale_codes(q, dl, None, out)


def _dequantize_q45_k(blocks: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    d, dmin = read_f16(blocks, 0), read_f16(blocks, 2)
    sc, m = _unpack_scale_min(blocks[:, 4:16])
    return _scale_codes(q, _sub_block_scales(d, sc), _sub_block_scales(dmin, m), out)


def dequantize_q4_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _dequantize_q45_k(blocks, nibble_codes(blocks, 16, 144, 32), out)


def dequantize_q5_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    q = nibble_codes(blocks, 48, 176, 32).bitwise_or_(_high_bit_codes(blocks, 16, 4))
    return _dequantize_q45_k(blocks, q, out)


def dequantize_q6_k(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    high = _crumb_codes(blocks, 128, at=4)
    q = nibble_codes(blocks, 0, 128, 64).bitwise_or_(high).view(torch.int8).sub_(32)
    return _scale_codes(q, _sub_block_scales(read_f16(blocks, 208), blocks[:, 192:208].view(torch.int8)), None, out)


# ---------------------------------------------------------------------------------------------- search helpers

def _const(value, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant on `like`'s device, rounded to float32 as the reference's np.float32 arithmetic does."""
    return torch.tensor(float(np.float32(value)), dtype=torch.float32, device=like.device)


def _qkx2_codes(x, origin, iscale, nmax):
    # A sub-block spanning float32 subnormals overflows iscale; ggml's nearest_int maps the resulting inf and nan to
    # code 0, which a zero iscale gives too. Finite products are within nmax + 1, where round == nearest_int.
    iscale = torch.where(torch.isfinite(iscale), iscale, 0.0)
    return torch.clamp(torch.round((x - origin) * iscale), 0, nmax)


def sequential_sums(*terms):
    """Sums over dim 0 of each `(n, ...)` tensor, adding rows one after another in float32 like ggml's
    `for (i...) sum += term[i]` (torch's own `sum` is cascaded). One loop for all terms, out-of-place, so that under
    torch.compile the adds fuse into a single pass over the rows, in order."""
    totals = [t[0] for t in terms]
    for i in range(1, terms[0].shape[0]):
        totals = [total + t[i] for total, t in zip(totals, terms)]
    return totals


def _qkx2_error(x, weights, trial, scale, min_, use_mad: bool):
    """Weighted error of `scale * trial + min` against x, summed per sub-block as ggml does (|d| or d² per element)."""
    diff = trial * scale + min_ - x
    (error,) = sequential_sums(weights * (diff.abs() if use_mad else diff * diff))
    return error


def _qkx2_step(x, weights, sum_w, sum_x, hi, lo, numerator, nmax: int, use_mad: bool):
    """One guess of make_qkx2_quants' search: codes for `numerator / (hi - lo)`, their least-squares scale and min,
    and the weighted error of that fit. Returns (iscale, scale, min, error, det)."""
    iscale = torch.div(numerator, hi - lo)
    trial = _qkx2_codes(x, lo, iscale, nmax)
    wl = weights * trial
    sum_l, sum_l2, sum_xl = sequential_sums(wl, wl * trial, wl * x)
    det = sum_w * sum_l2 - sum_l * sum_l
    this_scale = torch.div(sum_w * sum_xl - sum_x * sum_l, det)
    this_min = torch.div(sum_l2 * sum_x - sum_l * sum_xl, det)
    positive_min = this_min > 0
    this_scale = torch.where(positive_min, torch.div(sum_xl, sum_l2), this_scale)
    this_min = torch.where(positive_min, 0.0, this_min)
    return iscale, this_scale, this_min, _qkx2_error(x, weights, trial, this_scale, this_min, use_mad), det


_COMPILED: dict = {}  # function -> its compiled form, or itself where torch.compile is unavailable


def _on_device(fn, device: torch.device):
    """`fn` as run on `device`. On the CPU it is compiled by torch.compile into fused C++ loops: inductor builds with
    -ffp-contract=off and without unsafe math, so the float32 operations and their order are the eager ones and the
    bytes the same (the tests compare with the numpy reference), 2-3x faster than dozens of eager ops per guess.
    Without a working C++ compiler (found out at the first call), and on GPUs, the eager function runs."""
    if device.type != "cpu":
        return fn
    if fn not in _COMPILED:
        def first_call(*args):
            if _COMPILED[fn] is not first_call:  # resolved by an earlier call
                return _COMPILED[fn](*args)
            try:
                compiled = torch.compile(fn, dynamic=True)
                result = compiled(*args)
            except Exception as e:  # no C++ toolchain or an unsupported platform: correct, only slower
                import warnings

                warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}: {e}); K-quant quantization "
                              f"runs eagerly, about 2x slower (a C++ compiler makes it fast)")
                _COMPILED[fn] = fn
                return fn(*args)
            _COMPILED[fn] = compiled
            return result

        _COMPILED[fn] = first_call
    return _COMPILED[fn]


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """Asymmetric codes 0..nmax over sub-blocks `(n, B)`: returns (float codes, scale, the_min), see the reference.

    Instead of copying the best codes at every step, it remembers per sub-block the (iscale, min) that produced
    them and recomputes them once at the end: the same float32 operations give the same codes.
    """
    lo = x.amin(dim=0).clamp_(max=0)
    hi = x.amax(dim=0)
    flat = hi == lo
    sum_w, sum_x = sequential_sums(weights, weights * x)
    step = _on_device(_qkx2_step, x.device)

    iscale = torch.div(_const(nmax, x), hi - lo)
    scale = torch.div(_const(1, x), iscale)
    error = _qkx2_error(x, weights, _qkx2_codes(x, lo, iscale, nmax), scale, lo, use_mad)
    # the search's state, one row each, updated together where a guess fits better
    best_iscale, best_origin, best_error, scale, lo = state = torch.stack([iscale, lo, error, scale, lo])
    searchable = ~flat
    numerators = torch.tensor([np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax)
                               for i in range(nstep + 1)], dtype=torch.float32, device=x.device)
    for numerator in numerators.unbind(0):
        # ggml moves `min` to each better fit, so later guesses measure from it
        iscale, this_scale, this_min, this_error, det = step(x, weights, sum_w, sum_x, hi, lo, numerator, nmax,
                                                             use_mad)
        better = searchable & (det > 0) & (this_error < best_error)
        torch.where(better, torch.stack([iscale, lo, this_error, this_scale, this_min]), state, out=state)
    L = _qkx2_codes(x, best_origin, best_iscale, nmax)
    return torch.where(flat, 0.0, L), torch.where(flat, 0.0, scale), -lo


def _qx_trial(x, weights, wx, iscale, nmax: int):
    """make_qx_quants' codes for one scale guess and their sums (sum w*x*l, sum w*l*l)."""
    L = torch.clamp(torch.round(x * iscale), -nmax, nmax - 1)  # |x * iscale| <= nmax + 1: round == nearest_int
    return sequential_sums(wx * L, weights * L * L)


def make_qx_quants(x, nmax):
    """Symmetric codes with weights x² (ggml's rmse_type 1): returns (float codes + nmax, scale).

    Like make_qkx2_quants it keeps the best guess's iscale and recomputes its codes once at the end."""
    amax, signed_max = first_absmax(x)
    weights = x * x
    wx = weights * x
    trial = _on_device(_qx_trial, x.device)
    best_iscale = torch.div(_const(-nmax, x), signed_max)
    sumlx, suml2 = trial(x, weights, wx, best_iscale, nmax)
    scale = torch.where(suml2 != 0, torch.div(sumlx, suml2), 0.0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = torch.div(_const(-(np.float32(nmax) + np.float32(0.1) * step), x), signed_max)
        sumlx, suml2 = trial(x, weights, wx, iscale, nmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, torch.div(sumlx, suml2), scale)
        best = torch.where(better, scale * sumlx, best)
    L = torch.clamp(torch.round(x * best_iscale), -nmax, nmax - 1)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, L + nmax), torch.where(zero, 0.0, scale)


def make_q3_quants(x, nmax):
    """Symmetric codes refined one element at a time (ggml's do_rmse): returns (float codes + nmax, scale)."""
    amax, signed_max = first_absmax(x)
    weights = x * x
    wx = weights * x
    L = torch.mul(torch.div(_const(-nmax, x), signed_max), x).round_().clamp_(-nmax, nmax - 1)
    sumlx, suml2 = sequential_sums(wx * L, weights * L * L)
    searching = amax >= GROUP_MAX_EPS
    rows = list(zip(x.unbind(0), weights.unbind(0), wx.unbind(0), L.unbind(0)))
    for _ in range(5):
        changed = torch.zeros_like(searching)
        for xi, wi, wxi, li in rows:
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            # x * sl2 / slx is unbounded here: ggml's exact rounding before the clamp
            new_l = nearest_int(torch.div(xi * sl2, slx)).clamp_(-nmax, nmax - 1).to(torch.float32)
            accept = searching & (slx > 0) & (new_l != li)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            accept &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            torch.where(accept, new_l, li, out=li)
            sumlx = torch.where(accept, slx, sumlx)
            suml2 = torch.where(accept, sl2, suml2)
            changed |= accept
        searching &= changed
        if not bool(searching.any()):
            break
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, L + nmax), torch.where(zero, 0.0, torch.where(suml2 > 0, torch.div(sumlx, suml2), 0.0))


# ---------------------------------------------------------------------------------------------------- packing

def _pack_crumbs(codes):
    return pack_bits(codes.to(torch.uint8).reshape(-1, 2, 4, 32), 2).reshape(-1, 64)


def _pack_high_bits(bits):
    return pack_bits(bits.to(torch.uint8).reshape(-1, 8, 32), 1)


def _pack_nibble_runs(codes, run):
    nb = codes.shape[0]
    return pack_nibbles(codes.to(torch.uint8).reshape(nb, -1, 2 * run)).reshape(nb, -1)


def _pack_scale_min(sc, m):
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    low = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return torch.cat([low, mid, high], dim=-1)


def _pack_q3_scales(biased):
    biased = biased.to(torch.uint8)
    return torch.cat([pack_nibbles(biased & 0x0F), pack_bits((biased >> 4).reshape(-1, 4, 4), 2)], dim=-1)


def _sub_blocks(x, size):
    return x.reshape(-1, size).t().contiguous()


def _from_sub_blocks(columns, nb):
    return columns.t().reshape(nb, QK_K)


def _positive_max(values):
    """ggml's running `if (v > max) max = v` from +0.0: never negative, never -0.0."""
    top = values.amax(dim=-1, keepdim=True)
    return torch.where(top > 0, top, 0.0)


def _ratio_or_zero(numerator, denominator):
    return torch.where(denominator > 0, torch.div(_const(numerator, denominator), denominator), 0.0)


def _requantize(x, d, offset, qmin, qmax, keep):
    """Codes for the stored sub-block scales `d` `(nb, n_sub, 1)`; sub-blocks whose scale is 0 keep `keep`."""
    nb, n_sub = d.shape[:2]
    fresh = nearest_int(torch.div(x.reshape(nb, n_sub, -1) + offset, d)).clamp_(qmin, qmax)
    return torch.where(d == 0, keep.reshape(nb, n_sub, -1).to(torch.int32), fresh).reshape(nb, QK_K)


# ------------------------------------------------------------------------------------------------- quantizers

def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    cols = _sub_blocks(x, 16)
    L, scales, mins = make_qkx2_quants(cols, cols.abs(), 3, -0.5, 0.1, 15, True)
    L = _from_sub_blocks(L, nb)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    q_scale = torch.where(max_scale > 0, nearest_int(_ratio_or_zero(15, max_scale) * scales), 0)
    q_min = torch.where(max_min > 0, nearest_int(_ratio_or_zero(15, max_min) * mins), 0)
    d = torch.where(max_scale > 0, torch.div(max_scale, _const(15, x)), 0.0)
    dmin = torch.where(max_min > 0, torch.div(max_min, _const(15, x)), 0.0)
    dl = f16_round(d) * (q_scale & 0x0F).to(torch.float32)
    ml = f16_round(dmin) * (q_min & 0x0F).to(torch.float32)
    L = _requantize(x, dl[..., None], ml[..., None], 0, 3, L)
    packed_scales = (q_scale | (q_min << 4)).to(torch.uint8)
    return torch.cat([packed_scales, _pack_crumbs(L), f16_bytes(d), f16_bytes(dmin)], dim=-1)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    L, scales = make_q3_quants(_sub_blocks(x, 16), 4)
    L = _from_sub_blocks(L, nb)
    scales = scales.reshape(nb, 16)
    max_scale = first_absmax(scales.t())[1][:, None]
    iscale = torch.div(_const(-32, x), max_scale)
    # ggml narrows nearest_int's result to int8 before clamping
    biased = ((nearest_int(iscale * scales) + 128) & 0xFF).sub_(128).clamp_(-32, 31) + 32
    has_scale = max_scale != 0
    biased = torch.where(has_scale, biased, 0)
    d = torch.where(has_scale, torch.div(_const(1, x), iscale), 0.0)
    dl = f16_round(d) * (biased - 32).to(torch.float32)
    L = _requantize(x, dl[..., None], 0.0, -4, 3, L - 4) + 4
    high = L > 3
    return torch.cat([_pack_high_bits(high), _pack_crumbs(L - 4 * high.to(L.dtype)), _pack_q3_scales(biased),
                      f16_bytes(d)], dim=-1)


def _quantize_q45_k(x, nmax, rmin, nstep):
    """Shared by Q4_K and Q5_K: codes `(nb, 256)` in 0..nmax and the header (d, dmin, packed scales)."""
    nb = x.shape[0]
    cols = _sub_blocks(x, 32)
    # torch's float32 sqrt is not always correctly rounded on CPU; sqrt in float64 rounded once to float32 is
    (sum_x2,) = sequential_sums(cols * cols)
    av_x = torch.sqrt(torch.div(sum_x2, _const(32, x)).double()).float()
    L, scales, mins = make_qkx2_quants(cols, cols.abs().add_(av_x), nmax, rmin, 0.1, nstep, False)
    L = _from_sub_blocks(L, nb)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    ls = (nearest_int(_ratio_or_zero(63, max_scale) * scales) & 0xFF).clamp_(max=63)  # uint8_t, then MIN(63, .)
    lm = (nearest_int(_ratio_or_zero(63, max_min) * mins) & 0xFF).clamp_(max=63)
    d, dmin = torch.div(max_scale, _const(63, x)), torch.div(max_min, _const(63, x))
    dl = f16_round(d) * ls.to(torch.float32)
    ml = f16_round(dmin) * lm.to(torch.float32)
    L = _requantize(x, dl[..., None], ml[..., None], 0, nmax, L)
    return L, torch.cat([f16_bytes(d), f16_bytes(dmin), _pack_scale_min(ls, lm)], dim=-1)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    L, header = _quantize_q45_k(x, 15, -1.0, 20)
    return torch.cat([header, _pack_nibble_runs(L, 32)], dim=-1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    L, header = _quantize_q45_k(x, 31, -0.5, 15)
    return torch.cat([header, _pack_high_bits(L >> 4), _pack_nibble_runs(L & 0x0F, 32)], dim=-1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    L, scales = make_qx_quants(_sub_blocks(x, 16), 32)
    L = _from_sub_blocks(L, nb)
    scales = scales.reshape(nb, 16)
    amax, max_scale = first_absmax(scales.t())
    iscale = torch.div(_const(-128, x), max_scale[:, None])
    q_scales = nearest_int(iscale * scales).clamp_(max=127).to(torch.int8)
    d = torch.div(_const(1, x), iscale)
    dl = f16_round(d) * q_scales.to(torch.float32)
    L = (_requantize(x, dl[..., None], 0.0, -32, 31, L - 32) + 32).to(torch.uint8)
    low = _pack_nibble_runs(L & 0x0F, 64)
    high = pack_bits((L >> 4).reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
    packed = torch.cat([low, high, q_scales.view(torch.uint8), f16_bytes(d)], dim=-1)
    return packed.masked_fill_((amax < GROUP_MAX_EPS)[:, None], 0)
