"""ggml's K-quants: super-blocks of 256 elements split into sub-blocks whose scales (and mins) are themselves
quantized against fp16 super-block scales (ggml-common.h). Little-endian, no padding:

    Q2_K   84 B: scales[16] | qs[64] | d f16 | dmin f16
                 16 sub-blocks of 16; scales[j] = sc | m << 4 (4 bits each); q: 2 bits
                 x = d * sc * q - dmin * m
    Q3_K  110 B: hmask[32] | qs[64] | scales[12] | d f16
                 16 sub-blocks of 16; 6-bit signed scales (sc - 32); q: 2 low bits in qs + 1 high bit in hmask
                 x = d * (sc - 32) * (q_low - (high bit ? 0 : 4))
    Q4_K  144 B: d f16 | dmin f16 | scales[12] | qs[128]
                 8 sub-blocks of 32; 6-bit sc and m packed in 12 bytes (see `_unpack_scale_min`); q: 4 bits
                 x = d * sc * q - dmin * m
    Q5_K  176 B: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]      as Q4_K with a 5th bit per element in qh
    Q6_K  210 B: ql[128] | qh[64] | scales int8[16] | d f16
                 16 sub-blocks of 16; q: 4 low bits in ql + 2 high bits in qh; x = d * sc * (q - 32)

Element order inside the 2-bit, 4-bit and 6-bit planes: a super-block is cut into runs of 32 elements; run r of a
128-element half takes field r of the same 32 bytes (bit pair 2r, or the low/high nibble of a 64-byte span). The
5th bit (Q5_K) and 3rd bit (Q3_K) of element e are bit e // 32 of byte e % 32.

Quantizers follow `quantize_row_q*_K_ref` in ggml-quants.c (no importance matrix). Searches run over sub-blocks laid
out as `(elements, sub-blocks)` so that every sum adds elements one by one in float32, as the C loops do.
"""

from __future__ import annotations

import numpy as np

from kernels.formats import QK_K
from kernels.reference.common import (
    F32, f16_bytes, f16_round, first_absmax, nearest_int, pack_bits, pack_nibbles, read_f16, sequential_sum,
    unpack_bits, unpack_nibbles,
)

GROUP_MAX_EPS = F32(1e-15)


# ---------------------------------------------------------------------------------------------------- bit planes

def _unpack_crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit plane `(nb, 64)` -> codes `(nb, 256)`: half h, run r, element l is bits 2r of byte 32h + l."""
    return unpack_bits(qs.reshape(-1, 2, 32), 2).reshape(-1, QK_K)


def _pack_crumbs(codes: np.ndarray) -> np.ndarray:
    return pack_bits(codes.reshape(-1, 2, 4, 32), 2).reshape(-1, 64)


def _unpack_high_bits(plane: np.ndarray) -> np.ndarray:
    """1-bit plane `(nb, 32)` -> `(nb, 256)`: element e is bit e // 32 of byte e % 32."""
    return unpack_bits(plane, 1).reshape(-1, QK_K)


def _pack_high_bits(bits: np.ndarray) -> np.ndarray:
    return pack_bits(bits.reshape(-1, 8, 32), 1)


def _unpack_nibble_runs(qs: np.ndarray, run: int) -> np.ndarray:
    """Nibble plane -> codes: each span of `run` bytes holds `run` elements in low nibbles, then `run` in high."""
    return unpack_nibbles(qs.reshape(qs.shape[0], -1, run)).reshape(qs.shape[0], -1)


def _pack_nibble_runs(codes: np.ndarray, run: int) -> np.ndarray:
    return pack_nibbles(codes.reshape(codes.shape[0], -1, 2 * run)).reshape(codes.shape[0], -1)


# ------------------------------------------------------------------------------------- 6-bit scales of Q4_K / Q5_K

def _unpack_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `get_scale_min_k4` for all 8 sub-blocks: 12 bytes -> (sc, m), each `(nb, 8)` in 0..63.

    bytes 0-3: sc[0..3] in bits 0-5, sc[4..7] >> 4 in bits 6-7; bytes 4-7: m[0..3], m[4..7] >> 4 likewise;
    bytes 8-11: sc[4..7] & 15 in the low nibble, m[4..7] & 15 in the high nibble.
    """
    low, mid, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([low & 63, (high & 0x0F) | ((low >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    low = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=-1)


# ----------------------------------------------------------------------------------------- 6-bit scales of Q3_K

def _unpack_q3_scales(scales: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 signed scales: low nibbles of bytes 0-7 (sub-blocks 0-7), their high nibbles (8-15), and
    2 high bits per sub-block j at bits 2 * (j // 4) of byte 8 + j % 4."""
    low = unpack_nibbles(scales[:, :8])
    high = unpack_bits(scales[:, 8:12], 2).reshape(-1, 16)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _pack_q3_scales(biased: np.ndarray) -> np.ndarray:
    """Scales + 32 (0..63) `(nb, 16)` -> 12 bytes."""
    biased = biased.astype(np.uint8)
    return np.concatenate([pack_nibbles(biased & 0x0F), pack_bits((biased >> 4).reshape(-1, 4, 4), 2)], axis=-1)


# ------------------------------------------------------------------------------------------------ dequantizers

def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    scales = blocks[:, :16]
    q = _unpack_crumbs(blocks[:, 16:80]).reshape(nb, 16, 16).astype(np.float32)
    d, dmin = read_f16(blocks, 80), read_f16(blocks, 82)
    dl = (d * (scales & 0x0F).astype(np.float32))[..., None]
    ml = (dmin * (scales >> 4).astype(np.float32))[..., None]
    return (dl * q - ml).reshape(nb, QK_K)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    high = _unpack_high_bits(blocks[:, :32])
    low = _unpack_crumbs(blocks[:, 32:96])
    q = (low.astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)).reshape(nb, 16, 16).astype(np.float32)
    dl = (read_f16(blocks, 108) * _unpack_q3_scales(blocks[:, 96:108]).astype(np.float32))[..., None]
    return (dl * q).reshape(nb, QK_K)


def _dequantize_q45_k(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin = read_f16(blocks, 0), read_f16(blocks, 2)
    sc, m = _unpack_scale_min(blocks[:, 4:16])
    dl = (d * sc.astype(np.float32))[..., None]
    ml = (dmin * m.astype(np.float32))[..., None]
    return (dl * q.reshape(nb, 8, 32).astype(np.float32) - ml).reshape(nb, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    return _dequantize_q45_k(blocks, _unpack_nibble_runs(blocks[:, 16:144], 32))


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    q = _unpack_nibble_runs(blocks[:, 48:176], 32) | (_unpack_high_bits(blocks[:, 16:48]) << 4)
    return _dequantize_q45_k(blocks, q)


def _unpack_q6_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    nb = ql.shape[0]
    low = _unpack_nibble_runs(ql, 64)
    high = unpack_bits(qh.reshape(nb, 2, 32), 2).reshape(nb, QK_K)
    return low | (high << 4)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    q = _unpack_q6_codes(blocks[:, :128], blocks[:, 128:192]).astype(np.int8) - np.int8(32)
    dl = (read_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32))[..., None]
    return (dl * q.reshape(nb, 16, 16).astype(np.float32)).reshape(nb, QK_K)


# -------------------------------------------------------------------------------------------- scale searches
# Each takes sub-blocks as `(n, B)` float32 (elements down, sub-blocks across) and returns codes `(n, B)` and the
# sub-block scale `(B,)`, mirroring the ggml function of the same name.

def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """Asymmetric codes 0..nmax minimising the weighted error of `scale * L + min` over a grid of scale guesses.

    Returns (L, scale, the_min) with x ≈ scale * L - the_min.
    """
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    flat = hi == lo
    sum_w = sequential_sum(weights)
    sum_x = sequential_sum(weights * x)

    def error(scale, min_, L):
        diff = scale * L.astype(np.float32) + min_ - x
        return sequential_sum(weights * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)
    best_error = error(scale, lo, L)
    for step in range(nstep + 1):
        # ggml moves `min` to each better fit, so later guesses measure from it
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
        trial = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)
        lf = trial.astype(np.float32)
        wl = weights * lf
        sum_l, sum_l2, sum_xl = sequential_sum(wl), sequential_sum(wl * lf), sequential_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive_min = this_min > 0
        this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive_min, F32(0), this_min)
        this_error = error(this_scale, this_min, trial)
        better = ~flat & (det > 0) & (this_error < best_error)
        L = np.where(better, trial, L)
        best_error = np.where(better, this_error, best_error)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    return np.where(flat, 0, L), np.where(flat, F32(0), scale), -lo


def make_qx_quants(x, nmax):
    """Symmetric codes -nmax..nmax-1 with weights x², searching 18 scales around nmax / max (ggml's rmse_type 1).

    Returns (L + nmax, scale).
    """
    amax, signed_max = first_absmax(x)
    weights = x * x
    wx = weights * x

    def trial(iscale):
        L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = L.astype(np.float32)
        return L, sequential_sum(wx * lf), sequential_sum(weights * lf * lf)

    L, sumlx, suml2 = trial(F32(-nmax) / signed_max)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        candidate, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / signed_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, candidate, L)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, 0, L + nmax), np.where(zero, F32(0), scale)


def make_q3_quants(x, nmax):
    """Symmetric codes -nmax..nmax-1, then up to 5 passes that move single codes while the weighted fit improves.

    Returns (L + nmax, scale).
    """
    amax, signed_max = first_absmax(x)
    weights = x * x
    wx = weights * x
    L = np.clip(nearest_int(F32(-nmax) / signed_max * x), -nmax, nmax - 1)
    lf = L.astype(np.float32)
    sumlx = sequential_sum(wx * lf)
    suml2 = sequential_sum(weights * lf * lf)
    searching = amax >= GROUP_MAX_EPS
    for _ in range(5):
        changed = np.zeros_like(searching)
        for i in range(x.shape[0]):
            li = L[i].astype(np.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - weights[i] * li * li
            new_l = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
            nf = new_l.astype(np.float32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + weights[i] * nf * nf
            accept = searching & (sumlx - wx[i] * li > 0) & (new_l != L[i]) & (sl2 > 0) \
                & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(accept, new_l, L[i])
            sumlx = np.where(accept, slx, sumlx)
            suml2 = np.where(accept, sl2, suml2)
            changed |= accept
        searching &= changed
        if not searching.any():
            break
    zero = amax < GROUP_MAX_EPS
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, 0, L + nmax), np.where(zero, F32(0), scale)


def _sub_blocks(x: np.ndarray, size: int) -> np.ndarray:
    """`(nb, 256)` -> `(size, nb * 256 // size)`: one sub-block per column."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _from_sub_blocks(columns: np.ndarray, nb: int) -> np.ndarray:
    return columns.T.reshape(nb, QK_K)


def _positive_max(values: np.ndarray) -> np.ndarray:
    """ggml's running `if (v > max) max = v` from +0.0: never negative, never -0.0."""
    top = values.max(axis=-1, keepdims=True)
    return np.where(top > 0, top, F32(0))


def _requantize(x, d, offset, qmin, qmax, keep):
    """ggml's final pass: codes for the stored (fp16-rounded) sub-block scales `d`, `(nb, n_sub, 1)`; sub-blocks
    whose scale is 0 keep the codes `keep` found by the search."""
    nb, n_sub = d.shape[:2]
    fresh = np.clip(nearest_int((x.reshape(nb, n_sub, -1) + offset) / d), qmin, qmax)
    return np.where(d == 0, keep.reshape(nb, n_sub, -1), fresh).reshape(nb, QK_K)


# -------------------------------------------------------------------------------------------------- quantizers

def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    cols = _sub_blocks(x, 16)
    L, scales, mins = make_qkx2_quants(cols, np.abs(cols), 3, -0.5, 0.1, 15, True)
    L = _from_sub_blocks(L, nb)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    q_scale = np.where(max_scale > 0, nearest_int(F32(15) / max_scale * scales), 0)
    q_min = np.where(max_min > 0, nearest_int(F32(15) / max_min * mins), 0)
    d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
    dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    packed_scales = (q_scale | (q_min << 4)).astype(np.uint8)
    dl = f16_round(d) * (q_scale & 0x0F).astype(np.float32)
    ml = f16_round(dmin) * (q_min & 0x0F).astype(np.float32)
    L = _requantize(x, dl[..., None], ml[..., None], 0, 3, L)
    return np.concatenate([packed_scales, _pack_crumbs(L), f16_bytes(d), f16_bytes(dmin)], axis=-1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    L, scales = make_q3_quants(_sub_blocks(x, 16), 4)
    L = _from_sub_blocks(L, nb)
    _, max_scale = first_absmax(scales.reshape(nb, 16).T)
    max_scale = max_scale[:, None]
    iscale = F32(-32) / max_scale
    biased = np.clip(nearest_int(iscale * scales.reshape(nb, 16)).astype(np.int8), -32, 31) + 32
    has_scale = max_scale != 0
    biased = np.where(has_scale, biased, 0)
    d = np.where(has_scale, F32(1) / iscale, F32(0))
    dl = f16_round(d) * (biased - 32).astype(np.float32)
    L = _requantize(x, dl[..., None], F32(0), -4, 3, L - 4) + 4
    high = L > 3
    return np.concatenate(
        [_pack_high_bits(high), _pack_crumbs(L - 4 * high), _pack_q3_scales(biased), f16_bytes(d)], axis=-1)


def _quantize_q45_k(x, nmax, rmin, nstep):
    """Shared by Q4_K and Q5_K: codes `(nb, 256)` in 0..nmax, packed scale bytes, d and dmin."""
    nb = x.shape[0]
    cols = _sub_blocks(x, 32)
    av_x = np.sqrt(sequential_sum(cols * cols) / F32(32))
    L, scales, mins = make_qkx2_quants(cols, av_x + np.abs(cols), nmax, rmin, 0.1, nstep, False)
    L = _from_sub_blocks(L, nb)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale * scales) & 0xFF, 63)  # ggml stores into uint8_t before capping
    lm = np.minimum(nearest_int(inv_min * mins) & 0xFF, 63)
    d, dmin = max_scale / F32(63), max_min / F32(63)
    dl = f16_round(d) * ls.astype(np.float32)
    ml = f16_round(dmin) * lm.astype(np.float32)
    L = _requantize(x, dl[..., None], ml[..., None], 0, nmax, L)
    return L, np.concatenate([f16_bytes(d), f16_bytes(dmin), _pack_scale_min(ls, lm)], axis=-1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    L, header = _quantize_q45_k(x, 15, -1.0, 20)
    return np.concatenate([header, _pack_nibble_runs(L, 32)], axis=-1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    L, header = _quantize_q45_k(x, 31, -0.5, 15)
    return np.concatenate([header, _pack_high_bits(L >> 4), _pack_nibble_runs(L & 0x0F, 32)], axis=-1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    L, scales = make_qx_quants(_sub_blocks(x, 16), 32)
    L = _from_sub_blocks(L, nb)
    amax, max_scale = first_absmax(scales.reshape(nb, 16).T)
    max_scale = max_scale[:, None]
    iscale = F32(-128) / max_scale
    q_scales = np.minimum(nearest_int(iscale * scales.reshape(nb, 16)), 127).astype(np.int8)
    d = F32(1) / iscale
    dl = f16_round(d) * q_scales.astype(np.float32)
    L = _requantize(x, dl[..., None], F32(0), -32, 31, L - 32) + 32
    low = _pack_nibble_runs(L & 0x0F, 64)
    high = pack_bits((L >> 4).reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
    packed = np.concatenate([low, high, q_scales.view(np.uint8), f16_bytes(d)], axis=-1)
    return np.where((amax < GROUP_MAX_EPS)[:, None], np.uint8(0), packed)
