"""NF4: the numpy reference against bitsandbytes' own CPU code, and the torch codec against the numpy reference, bit
for bit."""

import numpy as np
import pytest
import torch
from bitsandbytes import functional as bnb
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

import kernels.torch_codecs.nf4 as torch_nf4
from kernels import reference
from kernels.reference import nf4

# Double quantization runs bitsandbytes' C kernel on CPU; without the native library it falls back to a torch
# nearest-code search, which is not what the reference reproduces.
needs_native_bnb = pytest.mark.skipif(isinstance(lib, ErrorHandlerMockBNBNativeLibrary),
                                      reason="bitsandbytes' native CPU library is not loaded")

CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def assert_same_floats(actual, expected):
    """Equal bit patterns, -0.0 included; NaNs only need to be NaN in the same places."""
    assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(actual), nan)
    assert np.array_equal(actual[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def blocks_of(*values):
    """One 64-element float32 block per argument (a scalar fills the block, a sequence is tiled)."""
    return np.stack([np.resize(np.asarray(v, dtype=np.float32), 64) for v in values])


def weights(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(n) * 0.02
    elif kind == "heavy_tailed":
        x = rng.standard_t(1.5, n)
    elif kind == "special_blocks":  # zeros, constants, subnormals, float32 extremes, one outlier among small values
        tiny = np.float32(1e-45) * rng.integers(-100, 100, 64)
        outlier = rng.standard_normal(64) * 1e-3
        outlier[17] = 40.0
        x = blocks_of(0.0, -0.0, 0.37, -2.5, tiny, tiny * 1e5, [3e38, -1e-30, 1.0], outlier)
        x = np.resize(x.reshape(-1), n)
    elif kind == "midpoints":  # every NF4 midpoint and its float32 neighbours, scaled by exact powers of two
        mids = nf4.NF4_MIDPOINTS
        ties = np.concatenate([mids, -mids, np.nextafter(mids, 2), np.nextafter(mids, -2)]).astype(np.float32)
        x = np.concatenate([blocks_of(np.append(ties, 1.0)), blocks_of(np.append(ties, -1.0)),
                            2.0 * blocks_of(np.append(ties, 1.0))])
        x = np.resize(x.reshape(-1), n)
    return np.asarray(x, dtype=np.float32).reshape(shape)


KINDS = ("normal", "heavy_tailed", "special_blocks", "midpoints")
# bitsandbytes' AVX-512 dequantize_4bit reads the wrong absmax when the last dimension is a multiple of 16 but not of
# the block size (e.g. (2, 96)); these shapes avoid that bug in the comparison's reference itself.
SHAPES = ((64,), (3, 128), (2, 3, 64), (16, 4), (512, 64))


def bnb_quantize(x, compress_statistics):
    return bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4",
                             compress_statistics=compress_statistics)


def bnb_dequantize(packed, state):
    return bnb.dequantize_4bit(packed, state).numpy().reshape(state.shape)  # it returns a 1-D weight as (1, n)


def double_quantized_weight_from_bnb(packed, state):
    return nf4.NF4Weight(codes=packed.numpy().reshape(-1), quantized_absmax=state.absmax.numpy(),
                         nested_absmax=state.state2.absmax.numpy(), nested_quant_map=state.state2.code.numpy(),
                         offset=state.offset.item())


def dequantize_weight(w, shape):
    return nf4.dequantize_nf4(nf4.to_blocks(w)).reshape(shape)


def test_nf4_values_are_bitsandbytes_code():
    assert_same_floats(nf4.NF4_VALUES, bnb.get_4bit_type("nf4", device="cpu").numpy())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_matches_bitsandbytes(kind, shape):
    x = weights(kind, shape)
    packed, state = bnb_quantize(x, compress_statistics=False)
    w = nf4.quantize_nf4_bnb(x, compress_statistics=False)
    assert np.array_equal(w.codes, packed.numpy().reshape(-1))
    assert_same_floats(w.absmax, state.absmax.numpy())
    assert_same_floats(dequantize_weight(w, shape), bnb_dequantize(packed, state))


def test_ties_take_the_lower_code():
    x = blocks_of(np.append(nf4.NF4_MIDPOINTS, 1.0))  # absmax 1: every midpoint is scaled to itself
    codes = nf4.from_blocks(nf4.quantize_nf4(x)).codes[:8]
    unpacked = np.stack([codes >> 4, codes & 0x0F], axis=-1).reshape(-1)
    assert list(unpacked[:15]) == list(range(15)) and unpacked[15] == 15


def test_zero_block_quantizes_to_code_7_with_zero_absmax():
    raw = nf4.quantize_nf4(blocks_of(0.0))
    assert raw[0, :4].view(np.float32)[0] == 0 and (raw[0, 4:] == 0x77).all()


def test_non_finite_weights_match_bitsandbytes():
    x = blocks_of([1.0, np.inf, -2.0], [np.nan, 0.5], [-np.inf, 3.0], [np.inf, -np.inf]).reshape(-1)
    packed, state = bnb_quantize(x, compress_statistics=False)
    w = nf4.quantize_nf4_bnb(x, compress_statistics=False)
    assert np.array_equal(w.codes, packed.numpy().reshape(-1))
    assert_same_floats(w.absmax, state.absmax.numpy())
    assert_same_floats(dequantize_weight(w, x.shape), bnb_dequantize(packed, state))


def test_generic_entry_points_match_bitsandbytes():
    x = weights("heavy_tailed", (6, 256), seed=3)
    raw = reference.quantize(x, "NF4")
    assert raw.shape == (6, 4 * 36) and raw.dtype == np.uint8
    packed, state = bnb_quantize(x, compress_statistics=False)
    # the layout: little-endian float32 absmax, then bitsandbytes' 32 packed bytes
    expected_raw = np.concatenate([state.absmax.numpy().astype("<f4").view(np.uint8).reshape(-1, 4),
                                   packed.numpy().reshape(-1, 32)], axis=1).reshape(6, -1)
    assert np.array_equal(raw, expected_raw)
    assert_same_floats(reference.dequantize(raw, "NF4"), bnb_dequantize(packed, state))


def test_blocks_round_trip_through_weight():
    raw = np.random.default_rng(1).integers(0, 256, (10, 36), dtype=np.uint8)
    assert np.array_equal(nf4.to_blocks(nf4.from_blocks(raw)), raw)


def test_signed_dynamic_map_is_bitsandbytes():
    assert_same_floats(nf4.SIGNED_DYNAMIC_MAP, bnb.create_dynamic_map(signed=True).numpy())


def spread_weights(nblocks, seed):
    """Blocks whose absmax values spread over several decades, so absmax - mean covers much of the 8-bit map."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-6, 2, (nblocks, 1)))
    return (rng.standard_normal((nblocks, 64)) * scales).astype(np.float32)


DOUBLE_QUANT_INPUTS = {
    "one_partial_nested_block": lambda: spread_weights(37, seed=5),
    "three_nested_blocks": lambda: spread_weights(600, seed=6),
    "constant_absmax": lambda: np.tile(np.linspace(-1, 1, 64, dtype=np.float32), (300, 1)),  # absmax - mean = 0
}


@pytest.mark.parametrize("case", DOUBLE_QUANT_INPUTS)
def test_double_quantized_weight_dequantizes_like_bitsandbytes(case):
    x = DOUBLE_QUANT_INPUTS[case]()
    packed, state = bnb_quantize(x, compress_statistics=True)
    w = double_quantized_weight_from_bnb(packed, state)
    bnb_absmax = (bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    assert_same_floats(nf4.absmax_of(w), bnb_absmax)
    assert_same_floats(dequantize_weight(w, x.shape), bnb_dequantize(packed, state))


@pytest.mark.parametrize("case", DOUBLE_QUANT_INPUTS)
def test_torch_blocks_from_bitsandbytes_equal_reference(case):
    """What the Forge loader runs (torch) against the reference's blocks, from bitsandbytes' own tensors."""
    x = DOUBLE_QUANT_INPUTS[case]()
    packed, state = bnb_quantize(x, compress_statistics=True)
    got = torch_nf4.blocks_from_bnb(packed, quantized_absmax=state.absmax, nested_absmax=state.state2.absmax,
                          nested_quant_map=state.state2.code, offset=state.offset.item())
    assert np.array_equal(got.numpy(), nf4.to_blocks(double_quantized_weight_from_bnb(packed, state)))
    packed, state = bnb_quantize(x, compress_statistics=False)
    got = torch_nf4.blocks_from_bnb(packed, state.absmax)
    assert np.array_equal(got.numpy(), nf4.to_blocks(nf4.NF4Weight(codes=packed.numpy().reshape(-1),
                                                                   absmax=state.absmax.numpy())))
    with pytest.raises(ValueError, match=r"absmax must have shape \(3,\)"):
        torch_nf4.blocks_from_bnb(torch.zeros(96, dtype=torch.uint8), torch.ones(2))


@needs_native_bnb
@pytest.mark.parametrize("case", DOUBLE_QUANT_INPUTS)
def test_double_quantize_matches_bitsandbytes(case):
    x = DOUBLE_QUANT_INPUTS[case]()
    packed, state = bnb_quantize(x, compress_statistics=True)
    # bitsandbytes' offset is torch's float32 mean, whose last bit depends on the summation order: take it as given
    w = nf4.double_quantize(nf4.quantize_nf4_bnb(x, compress_statistics=False), offset=state.offset.item())
    assert np.array_equal(w.codes, packed.numpy().reshape(-1))
    assert np.array_equal(w.quantized_absmax, state.absmax.numpy())
    assert_same_floats(w.nested_absmax, state.state2.absmax.numpy())
    assert_same_floats(w.nested_quant_map, state.state2.code.numpy())
    assert_same_floats(dequantize_weight(w, x.shape), bnb_dequantize(packed, state))

    own = nf4.quantize_nf4_bnb(x, compress_statistics=True)  # with our own offset: the exact mean, rounded once
    assert own.offset == pytest.approx(state.offset.item(), rel=1e-6)
    np.testing.assert_allclose(nf4.absmax_of(own), nf4.absmax_of(w), rtol=1e-3, atol=1e-6 * own.offset)


@needs_native_bnb
def test_8bit_absmax_quantization_matches_bitsandbytes_bin_by_bin():
    # values at, and one float32 step either side of, 2**17 evenly spaced points of [-1, 1] (the kernel's table has
    # 2**16 bins), with a 1.0 in every 256-value block so they are scaled by exactly 1
    grid = np.linspace(-1, 1, 2**17 + 1, dtype=np.float32)
    values = np.concatenate([grid, np.nextafter(grid, 2), np.nextafter(grid, -2)]).astype(np.float32)
    values = np.resize(values, (len(values) // 255 + 1, 255))
    values = np.concatenate([values, np.ones((len(values), 1), np.float32)], axis=1).reshape(-1)
    # with offset 0 the 8-bit quantizer sees exactly these values (NF4Weight does not insist on positive absmax)
    w = nf4.double_quantize(nf4.NF4Weight(codes=np.zeros(32 * len(values), np.uint8), absmax=values), offset=0.0)
    expected_codes, expected_state = bnb.quantize_blockwise(torch.from_numpy(values), blocksize=256)
    assert np.array_equal(w.quantized_absmax, expected_codes.numpy())
    assert_same_floats(w.nested_absmax, expected_state.absmax.numpy())


@pytest.mark.parametrize("device", ["cpu", *CUDA])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_quantize_matches_reference(kind, device):
    x = weights(kind, (256, 64), seed=7)
    x[-4:] = blocks_of([np.nan, 1.0], [np.inf, -1.0], -np.inf, [1e-40, -3e-41])  # non-finite and subnormal blocks
    raw = torch_nf4.quantize_nf4(torch.from_numpy(x).to(device))
    assert raw.device.type == device
    assert np.array_equal(raw.cpu().numpy(), nf4.quantize_nf4(x))


@pytest.mark.parametrize("device", ["cpu", *CUDA])
def test_torch_dequantize_matches_reference(device):
    raw = np.random.default_rng(8).integers(0, 256, (512, 36), dtype=np.uint8)  # all sorts of absmax bit patterns
    specials = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 3.4e38], dtype="<f4")
    raw[:len(specials), :4] = specials.view(np.uint8).reshape(-1, 4)
    out = torch_nf4.dequantize_nf4(torch.from_numpy(raw).to(device))
    assert out.device.type == device and out.dtype == torch.float32
    assert_same_floats(out.cpu().numpy(), nf4.dequantize_nf4(raw))


def test_torch_round_trip_of_non_contiguous_blocks():
    x = torch.from_numpy(weights("normal", (32, 128), seed=9))[:, 32:96]  # rows of 64 with a stride of 128
    raw = torch_nf4.quantize_nf4(x)
    assert np.array_equal(raw.numpy(), nf4.quantize_nf4(np.ascontiguousarray(x.numpy())))
    assert_same_floats(torch_nf4.dequantize_nf4(raw.T.contiguous().T).numpy(), nf4.dequantize_nf4(raw.numpy()))


@pytest.mark.parametrize("call, match", [
    (lambda: nf4.dequantize_nf4(np.zeros((2, 35), np.uint8)), "36 bytes"),
    (lambda: nf4.dequantize_nf4(np.zeros((2, 36), np.int8)), "uint8"),
    (lambda: nf4.dequantize_nf4(np.zeros(72, np.uint8)), "2-D"),
    (lambda: nf4.quantize_nf4(np.zeros((2, 64), np.float64)), "float32"),
    (lambda: nf4.quantize_nf4(np.zeros((2, 32), np.float32)), "64 elements"),
    (lambda: nf4.quantize_nf4_bnb(np.zeros(100, np.float32), compress_statistics=False), "multiple of 64"),
    (lambda: nf4.quantize_nf4_bnb(np.zeros(0, np.float32), compress_statistics=False), "multiple of 64"),
    (lambda: nf4.quantize_nf4_bnb(np.zeros(64, np.int32), compress_statistics=False), "floating point"),
    (lambda: nf4.quantize_nf4_bnb(blocks_of(np.inf), compress_statistics=True), "non-finite"),
    (lambda: nf4.double_quantize(nf4.quantize_nf4_bnb(blocks_of(1.0), True)), "already double-quantized"),
    (lambda: nf4.NF4Weight(codes=np.zeros(32, np.uint8), absmax=np.ones(2, np.float32)), r"shape \(1,\)"),
    (lambda: nf4.NF4Weight(codes=np.zeros(33, np.uint8), absmax=np.ones(1, np.float32)), "32-byte blocks"),
    (lambda: nf4.NF4Weight(codes=np.zeros(32, np.uint8)), "all required"),
    (lambda: nf4.NF4Weight(codes=np.zeros(32, np.uint8), absmax=np.ones(1, np.float32), offset=0.0), "not both"),
    (lambda: reference.quantize(np.zeros((3, 100), np.float32), "NF4"), "64-element blocks"),
    (lambda: reference.dequantize(np.zeros((3, 40), np.uint8), "NF4"), "36-byte blocks"),
    (lambda: torch_nf4.quantize_nf4(torch.zeros(2, 64, dtype=torch.float16)), "float32"),
    (lambda: torch_nf4.quantize_nf4(torch.zeros(128)), r"\(nblocks, 64\)"),
    (lambda: torch_nf4.dequantize_nf4(torch.zeros(2, 36)), "uint8"),
    (lambda: torch_nf4.dequantize_nf4(torch.zeros(2, 34, dtype=torch.uint8)), r"\(nblocks, 36\)"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
