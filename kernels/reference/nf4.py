"""NF4 (bitsandbytes' 4-bit NormalFloat), bit for bit as bitsandbytes computes it on CPU.

Our self-contained block, format "NF4" (64 weights in 36 bytes, 4.5 bits per weight):

    offset  size  field
    0       4     absmax  float32, little-endian: the largest |x| of the block
    4       32    qs      uint8[32]: 4-bit indices into NF4_VALUES; byte i holds element 2i in its HIGH nibble and
                          element 2i+1 in its LOW nibble (bitsandbytes' packing, the reverse of ggml's)

    x[j] = NF4_VALUES[code j] * absmax        (one float32 multiply)

bitsandbytes itself keeps the same numbers in separate tensors, which `NF4Weight` mirrors: the packed codes of the
flattened weight (`weight`), one float32 absmax per 64 weights (`absmax`) and, with `compress_statistics=True`
("double quantization"), those absmax values shifted by their mean and quantized again to 8 bits in blocks of 256
(`absmax` then holds uint8 indices, plus `nested_absmax`, `nested_quant_map` and the `nested_offset` of the quant
state). `absmax_of` undoes the second level, `to_blocks` / `from_blocks` convert to and from the raw blocks.

How bitsandbytes 0.50 computes, on CPU (read from bitsandbytes/backends/default/ops.py, backends/cpu/ops.py and
csrc/cpu_ops.cpp, and checked against it in tests/test_nf4.py):
- quantize_4bit: absmax = max|x| per block; scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1), all in float32;
  code = the number of NF4 midpoints (float32 (a + b) / 2) strictly below scaled, so a value exactly on a midpoint
  takes the LOWER code and NaN takes code 15. The stored absmax is the unclamped one.
- dequantize_4bit / dequantize_blockwise: code value * absmax, one float32 multiply.
- double quantization: offset = mean(absmax); (absmax - offset) quantized with quantize_blockwise(blocksize=256) and
  the signed dynamic map. On CPU that is the C kernel `quantize_cpu`, which does not search the nearest code: it maps
  the scaled value to one of 65536 evenly spaced bins and reads the code chosen for the bin (see `_quantize_8bit`).
  At dequantization: absmax = map[q] * nested_absmax + offset, each step rounded to float32.

bitsandbytes' CUDA kernels (csrc/kernels.cu, read but not tested here) dequantize identically and choose the same NF4
codes (a decision tree on the same float32 midpoints, ties down), except that they do not clamp absmax: an all-zero
block gets code 0 (dequantized to -0.0) and a block with a subnormal absmax is scaled differently. Their 8-bit
quantizer takes the nearest code, so double-quantized statistics made on a GPU can differ from ours by one code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import formats

_FORMAT = formats.get_format("NF4")
BLOCK_SIZE = _FORMAT.block_size  # 64 weights share one absmax
BLOCK_BYTES = _FORMAT.block_bytes  # 4 bytes of absmax + 32 bytes of codes
ABSMAX_BYTES = _FORMAT.offset("qs")
NESTED_BLOCK_SIZE = formats.NF4_NESTED_BLOCK  # absmax values sharing one nested absmax under double quantization

NF4_VALUES = np.array(formats.NF4_VALUES, dtype=np.float32)  # the code book (kernels/formats.py)
# Decision boundaries of the nearest-code search, computed in float32 like bitsandbytes' bucketize bounds.
NF4_MIDPOINTS = (NF4_VALUES[:-1] + NF4_VALUES[1:]) / np.float32(2)

SMALLEST_ABSMAX_DIVISOR = np.float32(formats.NF4_SMALLEST_ABSMAX_DIVISOR)  # see kernels/formats.py


def _signed_dynamic_map() -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map(signed=True): the 256 float32 codes of 8-bit double quantization.

    For each decade 1e-6 .. 1e0 it takes the midpoints of torch.linspace(0.1, 1, 2**i + 1) in float32, scaled by
    the decade (a float32 multiply), with both signs; then 0 and 1. torch's float32 linspace (its CPU kernels are
    built with FMA) computes start + step * i, or end - step * (n - 1 - i) in the upper half, as one fused
    multiply-add: emulated here in float64, where product and sum are exact, rounded once to float32.
    """
    start, end = np.float32(0.1), np.float32(1.0)
    codes = [np.array([0.0, 1.0], dtype=np.float32)]
    for i in range(7):
        steps = 2**i + 1
        step = (end - start) / np.float32(steps - 1)
        index = np.arange(steps)
        lower = index < steps // 2
        fused = np.where(lower, np.float64(start) + np.float64(step) * index,
                         np.float64(end) - np.float64(step) * (steps - 1 - index))
        boundaries = fused.astype(np.float32)
        midpoints = (boundaries[:-1] + boundaries[1:]) / np.float32(2)
        decade = np.float32(10.0 ** (i - 6))
        codes += [decade * midpoints, -(decade * midpoints)]
    return np.sort(np.concatenate(codes))


SIGNED_DYNAMIC_MAP = _signed_dynamic_map()


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A flattened NF4 weight in bitsandbytes' layout (what a bnb checkpoint stores for one `Linear4bit` weight).

    codes: uint8 `(numel / 2,)`, packed like the raw blocks (bnb's `weight`, flattened).
    absmax: float32 `(nblocks,)`, one per 64 weights; None when double-quantized.
    Double-quantized (bnb's compress_statistics=True) only:
      quantized_absmax: uint8 `(nblocks,)`, indices into `nested_quant_map` (bnb's `absmax` tensor then).
      nested_absmax: float32 `(ceil(nblocks / 256),)`, one per 256 absmax values.
      nested_quant_map: float32 `(256,)`, the 8-bit code book (SIGNED_DYNAMIC_MAP when we quantize).
      offset: the mean subtracted before the second quantization (bnb's `nested_offset`), a float32 value.
    """

    codes: np.ndarray
    absmax: np.ndarray | None = None
    quantized_absmax: np.ndarray | None = None
    nested_absmax: np.ndarray | None = None
    nested_quant_map: np.ndarray | None = None
    offset: float | None = None

    def __post_init__(self):
        _require_array(self.codes, "codes", np.uint8, 1)
        if self.codes.size == 0 or self.codes.size % (BLOCK_SIZE // 2):
            raise ValueError(f"NF4Weight: codes must hold a positive whole number of {BLOCK_SIZE // 2}-byte blocks,"
                             f" got {self.codes.size} bytes")
        nested = (self.quantized_absmax, self.nested_absmax, self.nested_quant_map, self.offset)
        if self.absmax is not None:
            if any(part is not None for part in nested):
                raise ValueError("NF4Weight: give either absmax or the double-quantized statistics, not both")
            _require_array(self.absmax, "absmax", np.float32, 1, (self.nblocks,))
            return
        if any(part is None for part in nested):
            raise ValueError("NF4Weight: without absmax, quantized_absmax, nested_absmax, nested_quant_map and "
                             "offset are all required")
        _require_array(self.quantized_absmax, "quantized_absmax", np.uint8, 1, (self.nblocks,))
        _require_array(self.nested_absmax, "nested_absmax", np.float32, 1, (-(self.nblocks // -NESTED_BLOCK_SIZE),))
        _require_array(self.nested_quant_map, "nested_quant_map", np.float32, 1, (256,))

    @property
    def numel(self) -> int:
        return 2 * self.codes.size

    @property
    def nblocks(self) -> int:
        return self.numel // BLOCK_SIZE

    @property
    def double_quantized(self) -> bool:
        return self.absmax is None


def _require_array(value, name: str, dtype, ndim: int, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim:
        got = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"NF4: {name} must be a {ndim}-D {np.dtype(dtype)} array, got {got}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"NF4: {name} must have shape {shape}, got {value.shape}")


def _quantize_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 `(nblocks, 64)` -> (packed codes uint8 `(nblocks, 32)`, absmax float32 `(nblocks,)`)."""
    absmax = np.abs(x).max(axis=1)
    # Non-finite weights give the codes bitsandbytes gives them (inf * 0 and NaN scale to NaN, code 15).
    with np.errstate(invalid="ignore"):
        scaled = np.clip(x * (np.float32(1) / np.maximum(absmax, SMALLEST_ABSMAX_DIVISOR))[:, None], -1, 1)
    codes = np.searchsorted(NF4_MIDPOINTS, scaled, side="left").astype(np.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2], absmax


def _unpack_codes(packed: np.ndarray) -> np.ndarray:
    """uint8 `(n, m)` -> codes `(n, 2m)`: high nibble first."""
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(packed.shape[0], -1)


def dequantize_nf4(blocks: np.ndarray) -> np.ndarray:
    """uint8 `(nblocks, 36)` raw NF4 blocks -> float32 `(nblocks, 64)`."""
    _require_array(blocks, "blocks", np.uint8, 2)
    if blocks.shape[1] != BLOCK_BYTES:
        raise ValueError(f"NF4: blocks must have {BLOCK_BYTES} bytes per row, got {blocks.shape[1]}")
    absmax = np.ascontiguousarray(blocks[:, :ABSMAX_BYTES]).view("<f4").astype(np.float32)
    codes = _unpack_codes(blocks[:, ABSMAX_BYTES:])
    with np.errstate(invalid="ignore"):  # 0 * inf absmax is NaN, as in bitsandbytes
        return NF4_VALUES[codes] * absmax


def quantize_nf4(x: np.ndarray) -> np.ndarray:
    """float32 `(nblocks, 64)` -> uint8 `(nblocks, 36)` raw NF4 blocks."""
    _require_array(x, "x", np.float32, 2)
    if x.shape[1] != BLOCK_SIZE:
        raise ValueError(f"NF4: x must have {BLOCK_SIZE} elements per row, got {x.shape[1]}")
    packed, absmax = _quantize_blocks(x)
    return _assemble_blocks(packed, absmax)


def _assemble_blocks(packed: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    absmax_bytes = absmax.astype("<f4").view(np.uint8).reshape(-1, ABSMAX_BYTES)
    return np.concatenate([absmax_bytes, packed], axis=1)


def quantize_nf4_bnb(x: np.ndarray, compress_statistics: bool) -> NF4Weight:
    """Any-shaped floating `x` (flattened, converted to float32; numel a positive multiple of 64) -> NF4Weight.

    Equals bitsandbytes.functional.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=...) on
    CPU, except that the double-quantization offset is the float32 rounding of the exact mean (see `double_quantize`).
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"NF4: x must be floating point, got {x.dtype}")
    if x.size == 0 or x.size % BLOCK_SIZE:
        raise ValueError(f"NF4: numel must be a positive multiple of {BLOCK_SIZE}, got {x.size}")
    packed, absmax = _quantize_blocks(x.astype(np.float32).reshape(-1, BLOCK_SIZE))
    weight = NF4Weight(codes=packed.reshape(-1), absmax=absmax)
    return double_quantize(weight) if compress_statistics else weight


def double_quantize(w: NF4Weight, offset: float | None = None) -> NF4Weight:
    """Quantize `w`'s absmax to 8 bits as bitsandbytes' compress_statistics=True does.

    `offset` defaults to mean(absmax) rounded once to float32. bitsandbytes takes torch's float32 mean, whose last
    bit depends on torch's summation order (vector width, threads, device); pass its `nested_offset` to reproduce a
    given quant state exactly.
    """
    if w.double_quantized:
        raise ValueError("NF4: weight is already double-quantized")
    if not np.isfinite(w.absmax).all():
        raise ValueError("NF4: cannot double-quantize non-finite absmax values (the weight holds inf or NaN)")
    if offset is None:
        offset = w.absmax.astype(np.float64).mean()
    offset = np.float32(offset)
    quantized, nested_absmax = _quantize_8bit(w.absmax - offset, SIGNED_DYNAMIC_MAP)
    return NF4Weight(codes=w.codes, quantized_absmax=quantized, nested_absmax=nested_absmax,
                     nested_quant_map=SIGNED_DYNAMIC_MAP, offset=float(offset))


# bitsandbytes' CPU 8-bit quantizer looks codes up in a table over 65536 evenly spaced points of [-1, 1].
_LUT_SIZE = 65536


def _quantize_8bit(values: np.ndarray, code_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 `(n,)` -> (uint8 `(n,)` indices into `code_map`, float32 absmax per 256 values).

    csrc/cpu_ops.cpp `quantize_cpu` step by step: a block whose absmax is 0 gets code 0; otherwise
    v = clamp(x * (1 / absmax), -1, 1) and bin = (int)fma((v + 1) * 0.5, 65535, 0.5) (compiled to one fused
    multiply-add), and the code of a bin is the number of code-map midpoints (float32 (a + b) * 0.5) strictly below
    the bin's value -1 + 2 * bin / 65535.
    """
    n = values.size
    padded = np.zeros(-(n // -NESTED_BLOCK_SIZE) * NESTED_BLOCK_SIZE, dtype=np.float32)  # 0 leaves max|x| unchanged
    padded[:n] = values
    blocks = padded.reshape(-1, NESTED_BLOCK_SIZE)
    absmax = np.abs(blocks).max(axis=1)
    zero_block = absmax == 0
    scaled = np.clip(blocks * (np.float32(1) / np.where(zero_block, np.float32(1), absmax))[:, None], -1, 1)
    half = (scaled + np.float32(1)) * np.float32(0.5)
    # The product of two float32 values is exact in float64 and so is adding 0.5 wherever the bin can still change,
    # so one rounding to float32 gives the fused multiply-add's result.
    bins = (half.astype(np.float64) * (_LUT_SIZE - 1) + 0.5).astype(np.float32).astype(np.int64)
    bin_values = (2 * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1) - np.float32(1)
    code_midpoints = (code_map[:-1] + code_map[1:]) * np.float32(0.5)
    bin_codes = np.searchsorted(code_midpoints, bin_values, side="left").astype(np.uint8)
    codes = np.where(zero_block[:, None], np.uint8(0), bin_codes[bins])
    return codes.reshape(-1)[:n], absmax


def absmax_of(w: NF4Weight) -> np.ndarray:
    """The float32 absmax per 64-weight block, as bitsandbytes dequantizes it (undoing double quantization)."""
    if not w.double_quantized:
        return w.absmax
    nested_scale = np.repeat(w.nested_absmax, NESTED_BLOCK_SIZE)[:w.nblocks]
    return w.nested_quant_map[w.quantized_absmax] * nested_scale + np.float32(w.offset)


def to_blocks(w: NF4Weight) -> np.ndarray:
    """NF4Weight -> uint8 `(nblocks, 36)` raw NF4 blocks."""
    return _assemble_blocks(w.codes.reshape(-1, BLOCK_SIZE // 2), absmax_of(w))


def from_blocks(blocks: np.ndarray) -> NF4Weight:
    """uint8 `(nblocks, 36)` raw NF4 blocks -> NF4Weight (plain float32 absmax)."""
    _require_array(blocks, "blocks", np.uint8, 2)
    if blocks.shape[1] != BLOCK_BYTES:
        raise ValueError(f"NF4: blocks must have {BLOCK_BYTES} bytes per row, got {blocks.shape[1]}")
    absmax = np.ascontiguousarray(blocks[:, :ABSMAX_BYTES]).view("<f4").astype(np.float32).reshape(-1)
    return NF4Weight(codes=blocks[:, ABSMAX_BYTES:].reshape(-1), absmax=absmax)
