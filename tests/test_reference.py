"""The numpy reference codecs against independent references: the gguf package (itself checked against ggml's C
code) and golden bytes written by ggml's C reference quantizer."""

import gguf
import numpy as np
import pytest

from kernels import reference
from kernels.formats import FORMATS, GGUF_FORMATS, get_format

GGUF_QUANTIZERS = ("F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what gguf.quants can quantize
GOLDEN_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
# llama.cpp tests/test-quantize-fns.cpp: RMSE/n bounds on its synthetic signal
MAX_ERROR = {"Q2_K": 0.0075, "Q3_K": 0.004}
MAX_ERROR_DEFAULT = 0.002

# fp16 bit patterns (little-endian byte pairs) that scale fields must survive
SPECIAL_F16 = {"zero": (0x00, 0x00), "neg_zero": (0x00, 0x80), "subnormal": (0x01, 0x00), "max_subnormal": (0xFF, 0x03),
               "inf": (0x00, 0x7C), "neg_inf": (0x00, 0xFC), "nan": (0x01, 0x7E), "neg_nan": (0x00, 0xFE)}


def gguf_type(name):
    return gguf.GGMLQuantizationType[name]


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_raw(fmt, n_blocks, seed):
    """Random blocks plus blocks filled with one fp16 pattern, which puts it in every scale field (all sit at even
    offsets) and makes every code byte take that pattern's bytes."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, fmt.block_bytes), dtype=np.uint8)
    patterns = [np.resize(np.array(p, dtype=np.uint8), fmt.block_bytes) for p in SPECIAL_F16.values()]
    return np.concatenate([raw, np.stack(patterns)])


def test_dequantize_reads_values(golden):
    # an independent sanity check on top of the bit-exact comparisons: ggml's own dequantization of its own bytes
    for name in GOLDEN_TYPES:
        assert same_bits(reference.dequantize(golden[f"q_{name}"], name), golden[f"y_{name}"]), name


@pytest.mark.parametrize("name", GGUF_FORMATS)
def test_dequantize_bit_exact_with_gguf(name):
    fmt = get_format(name)
    raw = random_raw(fmt, 4096 if fmt.is_quantized else 65536, seed=fmt.ggml_type)
    if fmt.is_quantized:
        raw = raw.reshape(-1, 4 * fmt.block_bytes)  # several blocks per row
        with np.errstate(all="ignore"):
            expected = gguf.quants.dequantize(raw, gguf_type(name))
    else:
        expected = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[name])
        expected = {"F32": lambda a: a, "F16": lambda a: a.astype(np.float32),
                    "BF16": lambda a: (a.astype(np.uint32) << 16).view(np.float32)}[name](expected)
        if name == "BF16":  # gguf's BF16 dequantizer is the same shift, through its generic path
            expected_gguf = gguf.quants.dequantize(raw.reshape(-1, 2), gguf_type(name)).reshape(expected.shape)
            assert same_bits(expected, expected_gguf)
    assert same_bits(reference.dequantize(raw, name), expected)


def edge_case_rows(width, seed):
    rng = np.random.default_rng(seed)
    rows = [
        rng.standard_normal(width),
        rng.standard_normal(width) * 0.02,
        rng.standard_t(3, width),
        rng.uniform(0, 1, width),
        rng.uniform(-1, 0, width),
        np.zeros(width),
        np.full(width, -2.5),
        np.full(width, 3.0),
        rng.integers(-8, 8, width) * 0.5,  # exact halves: rounding ties
        rng.standard_normal(width) * 1e-6,
        rng.standard_normal(width) * 1e-40,  # float32 subnormals
        rng.standard_normal(width) * 6e4,
        np.where(rng.uniform(size=width) < 0.9, 0, rng.standard_normal(width)),  # sparse
        np.exp(rng.standard_normal(width) * 4) * rng.choice([-1, 1], width),  # huge dynamic range
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", GGUF_QUANTIZERS)
def test_quantize_byte_identical_to_gguf(name):
    x = edge_case_rows(1024, seed=1)
    expected = gguf.quants.quantize(x, gguf_type(name)).view(np.uint8).reshape(len(x), -1)
    assert np.array_equal(reference.quantize(x, name), expected)


def test_float_quantizers_keep_specials():
    x = np.array([[np.inf, -np.inf, np.nan, -0.0, 1e-45, 3.4e38, 65520.0, 1 + 2**-8]], dtype=np.float32)
    for name in ("F16", "BF16"):
        expected = gguf.quants.quantize(x, gguf_type(name)).view(np.uint8)
        assert np.array_equal(reference.quantize(x, name), expected.reshape(1, -1)), name
    assert np.array_equal(reference.quantize(x, "F32"), x.view(np.uint8))


def error_per_block(raw, x, fmt):
    y = reference.dequantize(raw.reshape(-1, fmt.block_bytes), fmt.name)
    return ((y.astype(np.float64) - x.reshape(-1, fmt.block_size)) ** 2).sum(axis=-1)


@pytest.mark.parametrize("name", GOLDEN_TYPES)
def test_quantize_matches_ggml_golden_bytes(name, golden):
    fmt = get_format(name)
    x, expected = golden["x"], golden[f"q_{name}"]
    ours = reference.quantize(x, name)
    same = (ours.reshape(-1, fmt.block_bytes) == expected.reshape(-1, fmt.block_bytes)).all(axis=-1)
    assert same.mean() >= 0.99, f"{name}: {same.sum()}/{same.size} blocks identical to ggml"
    worse = error_per_block(ours, x, fmt) > error_per_block(expected, x, fmt)
    assert not (worse & ~same).any(), f"{name}: a differing block has a larger error than ggml's"


def llama_cpp_signal(n, offset):
    i = np.arange(n, dtype=np.float32)
    return (0.1 + 2 * np.cos(i + np.float32(offset)).astype(np.float32)).astype(np.float32)


@pytest.mark.parametrize("name", GOLDEN_TYPES)
def test_llama_cpp_error_threshold(name):
    for offset in (0.0, 0.37, 1.5, 100.0):
        x = llama_cpp_signal(4096, offset)
        y = reference.dequantize(reference.quantize(x, name), name)
        rmse_over_n = np.sqrt(((y.astype(np.float64) - x) ** 2).sum()) / x.size
        assert rmse_over_n <= MAX_ERROR.get(name, MAX_ERROR_DEFAULT), (name, offset, rmse_over_n)


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_shapes_and_accuracy(name):
    fmt = get_format(name)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    raw = reference.quantize(x, name)
    assert raw.dtype == np.uint8 and raw.shape == (2, 3, fmt.row_bytes(512))
    y = reference.dequantize(raw, name)
    assert y.dtype == np.float32 and y.shape == x.shape
    # relative RMS error roughly 2^-bits: loose enough for every format (the unscaled 8-bit float F8_E4M3, whose
    # 3 mantissa bits give 0.027, is the loosest), tight enough to catch a wrong layout
    rel = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    assert rel < 2.0 ** -(min(fmt.bits_per_weight, 10) - 3), rel


def test_all_zero_input_gives_zeros():
    for name in FORMATS:
        y = reference.dequantize(reference.quantize(np.zeros((2, 256), np.float32), name), name)
        assert not y.any(), name


@pytest.mark.parametrize("call, message", [
    (lambda: reference.dequantize(np.zeros((1, 18), np.uint8), "Q4_9"), "unknown weight format 'Q4_9'"),
    (lambda: reference.quantize(np.zeros((1, 32), np.float32), "Q4_O"), "unknown weight format 'Q4_O'"),
    (lambda: reference.dequantize(np.zeros((1, 20), np.uint8), "Q4_0"), "20 bytes is not a whole number of 18-byte"),
    (lambda: reference.quantize(np.zeros((1, 100), np.float32), "Q4_K"), "100 elements is not a whole number of 256"),
    (lambda: reference.dequantize(np.zeros((1, 18), np.float32), "Q4_0"), "must be uint8"),
    (lambda: reference.quantize(np.zeros((1, 32), np.int32), "Q8_0"), "must be floating point"),
    (lambda: reference.quantize(np.float32(1.0), "F16"), "at least one axis"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_registry_agrees_with_gguf():
    for name in GGUF_FORMATS:
        fmt = get_format(name)
        assert gguf_type(name).value == fmt.ggml_type
        assert gguf.GGML_QUANT_SIZES[gguf_type(name)] == (fmt.block_size, fmt.block_bytes)


def test_quantized_formats_reject_non_finite_input():
    x = np.ones((1, 256), np.float32)
    x[0, 5] = np.inf
    for name in FORMATS:
        if get_format(name).is_quantized:
            with pytest.raises(ValueError, match="inf or nan"):
                reference.quantize(x, name)
