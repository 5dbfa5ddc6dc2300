"""The planes layout (`kernels/repack.py`): lossless, the size of the stored bytes on Flux's shapes, the element order
its docstring promises, and a QuantLinear repacked where it lives computing what it computed before."""

import numpy as np
import pytest
import torch

from kernels import QTensor, reference
from kernels.formats import FORMATS, get_format
from kernels.quant_linear import QuantLinear
from kernels.repack import has_planes, plane_offsets, planes_row_bytes, to_blocks, to_planes

PLANES_FORMATS = [name for name, f in FORMATS.items() if f.codes is not None]
# Flux-dev's Linear input sizes: hidden, MLP, T5 context, CLIP pooled, timestep embedding
FLUX_K = (3072, 12288, 4096, 768, 256)


def reference_raw(fmt: str, rows: int, K: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(reference.quantize((rng.standard_normal((rows, K)) * 0.1).astype(np.float32), fmt))


@pytest.mark.parametrize("blocks", [1, 3, 7, 96])
@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_round_trip_is_bit_identical(fmt, blocks):
    K = blocks * get_format(fmt).block_size
    raw = reference_raw(fmt, 5, K)
    planes = to_planes(raw, fmt)
    assert planes.shape == (5, planes_row_bytes(get_format(fmt), K)) and planes.shape[1] % 16 == 0
    assert torch.equal(to_blocks(planes, fmt, K), raw)
    weight = QTensor(raw, fmt, (5, K))
    assert torch.equal(weight.planes().dequantize(), torch.from_numpy(reference.dequantize(raw.numpy(), fmt)))


@pytest.mark.parametrize("fmt", PLANES_FORMATS)
def test_planes_take_the_stored_bytes_on_flux_shapes(fmt):
    """At least the stored row rounded up to the 16 bytes every row starts on, and within the +2% the VRAM budget
    allows on every Flux layer but the time, guidance and vector embedders' inputs (3072 rows of K = 256 or 768: one
    or three super-blocks a row, every 2-byte plane padded to 16)."""
    f = get_format(fmt)
    for K in FLUX_K:
        assert planes_row_bytes(f, K) >= -(-f.row_bytes(K) // 16) * 16
        assert K in (256, 768) or planes_row_bytes(f, K) <= 1.02 * f.row_bytes(K)
    if fmt in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "NF4"):  # no 2-byte per-super-block fields
        assert all(planes_row_bytes(f, K) == f.row_bytes(K) for K in FLUX_K)
    # elsewhere each plane is padded to 16 bytes at most
    assert planes_row_bytes(f, f.block_size) - f.block_bytes < 16 * len(f.fields)


def test_q4_0_codes_are_paired_in_element_order():
    codes = np.arange(32) % 16  # element e has code e % 16
    block = np.zeros(18, dtype=np.uint8)
    block[:2] = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    block[2:] = codes[:16] | (codes[16:] << 4)  # ggml: low nibbles = elements 0..15
    planes = to_planes(torch.from_numpy(block[None]), "Q4_0")[0].numpy()
    offsets = plane_offsets(get_format("Q4_0"), 32)
    assert list(planes[offsets["d"]:offsets["d"] + 2]) == list(block[:2])
    assert list(planes[offsets["qs"]:offsets["qs"] + 16]) == [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16)]


def test_nf4_codes_move_to_the_low_nibble_first():
    f = get_format("NF4")
    block = np.zeros((1, f.block_bytes), dtype=np.uint8)
    block[0, 4:] = 0x3A  # bitsandbytes: element 2i in the high nibble (3), 2i+1 in the low one (10)
    planes = to_planes(torch.from_numpy(block), "NF4")[0].numpy()
    assert set(planes[plane_offsets(f, 64)["qs"]:][:32]) == {0xA3}


def test_q3_k_third_bits_spread_a_nibble_to_a_byte():
    """Q3_K's hmask plane: in each 32-bit word (32 elements), bit 8b + 4h + i holds element 16h + 4b + i's third
    bit, as its decoders merge them (bit i of byte b: element 4b + i of a 16)."""
    f = get_format("Q3_K")
    third = np.random.default_rng(1).integers(0, 2, 256)  # element e's third bit
    block = np.zeros((1, f.block_bytes), dtype=np.uint8)
    for e in range(256):  # ggml: element e's at bit e // 32 of hmask byte e % 32
        block[0, e % 32] |= third[e] << (e // 32)
    planes = to_planes(torch.from_numpy(block), "Q3_K")[0].numpy()
    words = planes[plane_offsets(f, 256)["hmask"]:][:32].view("<u4")
    for e in range(256):
        word, e32 = divmod(e, 32)
        bit = 8 * ((e32 % 16) // 4) + 4 * (e32 // 16) + e32 % 4
        assert (int(words[word]) >> bit) & 1 == third[e], e


def test_formats_without_planes_keep_their_blocks():
    raw = reference_raw("F8_E4M3", 2, 256)  # every block-quantized format has planes; FP8 is one byte a weight
    weight = QTensor(raw, "F8_E4M3", (2, 256))
    assert not has_planes("F8_E4M3") and weight.planes() is weight
    with pytest.raises(ValueError, match="F8_E4M3 has no planes layout; formats with one: Q8_0"):
        to_planes(raw, "F8_E4M3")
    with pytest.raises(ValueError, match="layout must be one of blocks, planes"):
        QTensor(raw, "F8_E4M3", (2, 256), layout="tiles")
    q8 = reference_raw("Q8_0", 2, 96)
    with pytest.raises(ValueError, match=r"\(planes\): raw has shape \(2, 102\), expected \(2, 112\)"):
        QTensor(q8, "Q8_0", (2, 96), layout="planes")


@pytest.mark.parametrize("fmt", ["Q8_0", "Q5_1", "NF4"])
def test_quant_linear_repacked_in_place_computes_the_same(fmt):
    raw = reference_raw(fmt, 24, 3 * get_format(fmt).block_size)
    layer = QuantLinear(QTensor(raw, fmt, (24, raw.shape[1] // get_format(fmt).block_bytes
                                          * get_format(fmt).block_size)), torch.randn(24))
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    assert layer.to_planes_() is layer and layer.layout == "planes" and "layout=planes" in repr(layer)
    assert layer.raw.shape == (24, planes_row_bytes(get_format(fmt), layer.in_features))
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
