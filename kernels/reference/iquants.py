"""IQ4_NL and IQ4_XS: 4-bit codes into a fixed non-linear table (ggml's "non-linear" quants), numpy ground truth.

Block layouts (as in ggml-common.h; all multi-byte fields little endian):

    #define QK4_NL 32
    typedef struct {                      // IQ4_NL: 32 weights in 18 bytes (4.5 bits/weight)
        ggml_half d;                      // bytes 0..1   fp16 block scale
        uint8_t   qs[QK4_NL/2];           // bytes 2..17  byte j: low nibble = code of x[j], high nibble = code of x[j+16]
    } block_iq4_nl;                       // x[j] = d * kvalues_iq4nl[code]

    #define QK_K 256
    typedef struct {                      // IQ4_XS: 256 weights in 136 bytes (4.25 bits/weight), 8 sub-blocks of 32
        ggml_half d;                      // bytes 0..1   fp16 super-block scale
        uint16_t  scales_h;               // bytes 2..3   bits 2*ib..2*ib+1 = high 2 bits of sub-block ib's 6-bit scale
        uint8_t   scales_l[QK_K/64];      // bytes 4..7   byte ib/2, nibble ib%2 = low 4 bits of sub-block ib's scale
        uint8_t   qs[QK_K/2];             // bytes 8..135 16 bytes per sub-block, nibbles packed as in block_iq4_nl
    } block_iq4_xs;                       // ls = 6-bit scale; x = (d * (ls - 32)) * kvalues_iq4nl[code]

    kvalues_iq4nl = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}

Quantizers follow ggml's `quantize_row_iq4_nl_impl` without an importance matrix (weights w = x*x):

* IQ4_NL = `quantize_iq4_nl(x, y, 1, n, NULL)`, i.e. the scale search with ntry = 7. (That is what llama.cpp's
  quantize tool writes; newer ggml's `quantize_row_iq4_nl_ref` passes ntry = -1, which does not reproduce the golden
  vectors in tests/.)
* IQ4_XS = `quantize_iq4_xs(x, y, 1, n, NULL)` (= `quantize_row_iq4_xs_ref`), ntry = 7 on every 32-weight sub-block,
  then 6-bit sub-block scales relative to one fp16 super-block scale.

Bit exactness with the C code: every value is float32, the weighted sums are accumulated sequentially in element
order (explicit loop over the 32 elements of a sub-block, the vectorised axis runs over sub-blocks), products are
evaluated as C does (`w*q*x` == `(w*q)*x`). `best_index_int8` (binary search then `x - v[i] < v[i+1] - x`) picks the
upper neighbour exactly when x >= the midpoint of two neighbouring table values (every midpoint is a multiple of 0.5
and both differences are exact there), so it is a table lookup on floor(2*x); NaN maps to 15 as in C.
`nearest_int` is round-half-to-even (np.rint in float32).
"""

from __future__ import annotations

import numpy as np

from kernels.formats import FORMATS, IQ4_VALUES, QK4_NL, QK_K
from kernels.reference.common import pack_nibbles, read_f16, unpack_nibbles

__all__ = ["KVALUES", "dequantize_iq4_nl", "quantize_iq4_nl", "dequantize_iq4_xs", "quantize_iq4_xs"]

IQ4_NL_BYTES = FORMATS["IQ4_NL"].block_bytes
IQ4_XS_BYTES = FORMATS["IQ4_XS"].block_bytes

KVALUES = np.array(IQ4_VALUES, dtype=np.int8)
_VF = KVALUES.astype(np.float32)
_MID = (_VF[:-1] + _VF[1:]) / np.float32(2)  # 15 decision thresholds, all multiples of 0.5

# best_index(x) == _IDX_LUT[clip(floor(2x), -256, 255) + 256]: bucket [k/2, (k+1)/2) holds no threshold inside.
_LUT_LO = -256
_LUT_HI = 255
_IDX_LUT = np.searchsorted(_MID, np.arange(_LUT_LO, _LUT_HI + 1, dtype=np.float32) / np.float32(2),
                           side="right").astype(np.uint8)
_Q_LUT = _VF[_IDX_LUT]

_F0 = np.float32(0)
_F1 = np.float32(1)
_F2 = np.float32(2)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_NTRY = 7
# (itry + values[0]) for itry = -ntry..ntry, converted to float as C does
_TRY_NUM = (np.arange(-_NTRY, _NTRY + 1) + int(KVALUES[0])).astype(np.float32)

_CHUNK = 4096  # sub-blocks per vectorised step of the quantizers (bounds temporary memory)


def _lut_bucket(al: np.ndarray) -> np.ndarray:
    k = np.floor(al * _F2)
    np.fmin(k, np.float32(_LUT_HI), out=k)  # fmin/fmax: NaN -> 255 (the top bucket, index 15 as in ggml)
    np.fmax(k, np.float32(_LUT_LO), out=k)
    return k.astype(np.intp) - _LUT_LO


def best_index(al: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, al) elementwise (uint8)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _IDX_LUT[_lut_bucket(np.asarray(al, dtype=np.float32))]


def _search_chunk(X: np.ndarray) -> np.ndarray:
    """Sub-block scales of quantize_row_iq4_nl_impl (no imatrix, ntry = 7) for X: float32 (32, M) element-major
    (X[j] = element j of every sub-block)."""
    M = X.shape[1]
    W = X * X
    AX = np.abs(X)
    AX[np.isnan(AX)] = _F0  # `fabsf(x) > amax` is false for NaN
    imax = AX.argmax(axis=0)  # first index of the largest |x| (C updates on strictly greater)
    cols = np.arange(M)
    amax = AX[imax, cols]
    mx = X[imax, cols]
    zero = ~(amax >= _EPS)  # amax < GROUP_MAX_EPS (all-zero sub-block: scale 0)
    mx = np.where(zero, _F1, mx)  # keeps the arithmetic below finite; those results are discarded

    # row 0: first pass with d = -max/values[0], id = 1/d; rows 1..15: id = (itry + values[0]) / max
    ID = np.empty((1 + _TRY_NUM.size, M), dtype=np.float32)
    ID[0] = _F1 / (-mx / _VF[0])
    ID[1:] = _TRY_NUM[:, None] / mx[None, :]

    sqx = np.zeros_like(ID)
    sq2 = np.zeros_like(ID)
    for j in range(QK4_NL):  # sequential float32 accumulation in element order, as in C
        q = _Q_LUT[_lut_bucket(ID * X[j])]
        t = W[j] * q  # w*q
        sqx += t * X[j]  # (w*q)*x
        sq2 += t * q  # (w*q)*q

    d = np.where(sq2[0] > _F0, sqx[0] / np.where(sq2[0] > _F0, sq2[0], _F1), _F0)
    best = d * sqx[0]
    for t in range(1, ID.shape[0]):
        s_qx, s_q2 = sqx[t], sq2[t]
        better = (s_q2 > _F0) & (s_qx * s_qx > best * s_q2)
        dt = s_qx / np.where(better, s_q2, _F1)
        d = np.where(better, dt, d)
        best = np.where(better, dt * s_qx, best)
    return np.where(zero, _F0, d)


def _check_blocks(a: np.ndarray, width: int, dtype, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{what}: expected shape (nblocks, {width}), got {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- IQ4_NL


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """uint8 (nblocks, 18) -> float32 (nblocks, 32)."""
    b = _check_blocks(blocks, IQ4_NL_BYTES, np.uint8, "dequantize_iq4_nl")
    d = read_f16(b, 0)[:, 0]
    with np.errstate(invalid="ignore"):  # inf * code stays as in C; only 0 * inf makes NaN
        return d[:, None] * _VF[unpack_nibbles(b[:, 2:])]


def _quantize_nl_chunk(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    out = np.empty((n, IQ4_NL_BYTES), dtype=np.uint8)
    X = np.ascontiguousarray(x.T)  # (32, n)
    with np.errstate(all="ignore"):
        d = _search_chunk(X)
        idn = np.where(d != _F0, _F1 / np.where(d != _F0, d, _F1), _F0)  # id = scales[0] ? 1/scales[0] : 0
        L = best_index(idn[None, :] * X)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
    out[:, 2:] = pack_nibbles(L.T)  # L: codes (32, M), element-major
    return out


def quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    """float32 (nblocks, 32) -> uint8 (nblocks, 18), as ggml's quantize_iq4_nl(x, y, 1, n, NULL)."""
    x = _check_blocks(x, QK4_NL, np.float32, "quantize_iq4_nl")
    out = np.empty((x.shape[0], IQ4_NL_BYTES), dtype=np.uint8)
    for c0 in range(0, x.shape[0], _CHUNK):
        out[c0:c0 + _CHUNK] = _quantize_nl_chunk(x[c0:c0 + _CHUNK])
    return out


# ---------------------------------------------------------------------------------------------------- IQ4_XS


def _xs_sub_scales(b: np.ndarray) -> np.ndarray:
    """(n, 136) -> signed 6-bit sub-block scales ls - 32 as float32 (n, 8)."""
    sh = b[:, 2].astype(np.uint16) | (b[:, 3].astype(np.uint16) << np.uint16(8))
    ib = np.arange(QK_K // 32)
    lo = (b[:, 4 + ib // 2] >> (4 * (ib % 2)).astype(np.uint8)) & np.uint8(0x0F)
    hi = ((sh[:, None] >> (2 * ib).astype(np.uint16)) & np.uint16(3)).astype(np.uint8)
    return ((lo | (hi << np.uint8(4))).astype(np.int16) - 32).astype(np.float32)


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """uint8 (nblocks, 136) -> float32 (nblocks, 256)."""
    b = _check_blocks(blocks, IQ4_XS_BYTES, np.uint8, "dequantize_iq4_xs")
    n = b.shape[0]
    d = read_f16(b, 0)[:, 0]
    codes = unpack_nibbles(b[:, 8:].reshape(n, QK_K // 32, 16))  # (n, 8, 32)
    with np.errstate(invalid="ignore"):
        dl = d[:, None] * _xs_sub_scales(b)  # (n, 8): d * (ls - 32)
        return (dl[:, :, None] * _VF[codes]).reshape(n, QK_K)


def _quantize_xs_chunk(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    nsub = QK_K // 32
    out = np.empty((n, IQ4_XS_BYTES), dtype=np.uint8)
    X = np.ascontiguousarray(x.reshape(n * nsub, 32).T)  # (32, n*8): column 8*i + ib = sub-block ib of block i
    with np.errstate(all="ignore"):
        scales = _search_chunk(X).reshape(n, nsub)
        ab = np.abs(scales)
        ab[np.isnan(ab)] = _F0
        imax = ab.argmax(axis=1)  # first sub-block with the largest |scale| (strictly greater in C)
        rows = np.arange(n)
        max_scale = np.where(ab[rows, imax] > _F0, scales[rows, imax], _F0)  # stays +0.0f when all are 0
        d = -max_scale / np.float32(32)
        idd = np.where(d != _F0, _F1 / np.where(d != _F0, d, _F1), _F0)
        l = np.rint(idd[:, None] * scales)  # nearest_int (round half to even)
        l = np.clip(np.where(np.isnan(l), _F0, l), -32, 31).astype(np.float32)  # NaN: ggml's bit trick gives 0
        dl = d[:, None] * l
        idl = np.where(dl != _F0, _F1 / np.where(dl != _F0, dl, _F1), _F0)
        L = best_index(idl.reshape(1, n * nsub) * X)  # (32, n*8)
    ls = (l.astype(np.int16) + 32).astype(np.uint8)  # (n, 8), 0..63
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
    sh = np.zeros(n, dtype=np.uint16)
    for ib in range(nsub):
        sh |= (ls[:, ib] >> np.uint8(4)).astype(np.uint16) << np.uint16(2 * ib)
    out[:, 2] = (sh & np.uint16(0xFF)).astype(np.uint8)
    out[:, 3] = (sh >> np.uint16(8)).astype(np.uint8)
    low = ls & np.uint8(0x0F)
    out[:, 4:8] = low[:, 0::2] | (low[:, 1::2] << np.uint8(4))
    out[:, 8:] = pack_nibbles(L.T).reshape(n, nsub * 16)
    return out


def quantize_iq4_xs(x: np.ndarray) -> np.ndarray:
    """float32 (nblocks, 256) -> uint8 (nblocks, 136), as ggml's quantize_iq4_xs(x, y, 1, n, NULL)."""
    x = _check_blocks(x, QK_K, np.float32, "quantize_iq4_xs")
    out = np.empty((x.shape[0], IQ4_XS_BYTES), dtype=np.uint8)
    step = max(1, _CHUNK // (QK_K // 32))
    for c0 in range(0, x.shape[0], step):
        out[c0:c0 + step] = _quantize_xs_chunk(x[c0:c0 + step])
    return out
