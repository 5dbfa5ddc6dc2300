"""The torch codecs against the numpy reference: dequantization bit-identical, quantization byte-identical, on the
CPU and, where there is one, on CUDA."""

import numpy as np
import pytest
import torch

from kernels import reference, torch_codecs
from kernels.formats import FORMATS, get_format

# Formats whose NaN payloads torch does not reproduce on the CPU; NaN-ness and all other bits must still match.
#   F16: torch converts fp16 <-> fp32 with the CPU's F16C instructions, which quiet a signalling NaN; numpy's
#        conversion keeps it signalling.
#   Q4_1, Q5_1, Q2_K, Q4_K, Q5_K (`q * d + m`, `dl * q - ml`): when both terms are NaN (NaN d and NaN m), numpy's
#        add/sub returns the first term's NaN, torch's (which computes first + alpha * second) the second's (x86).
# On CUDA every NaN an arithmetic operation produces is the canonical 0x7FFFFFFF, so only NaN-ness is compared there.
NAN_PAYLOADS_DIFFER = {"F16", "Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# fp16 scale values that dequantization must carry through as ggml does: zeros, subnormals, infinities, NaNs
# (quiet and signalling, both signs).
SPECIAL_F16 = (0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE01)
BLOCKS_PER_SPECIAL = 16


def random_raw(fmt, n_random, seed):
    """`n_random` blocks of random bytes, then blocks whose 2-byte pairs are each, with even odds, one special fp16
    value or random: every fp16 field of every format sits at an even offset, so each special value lands in each
    scale field of about half of its blocks, next to random codes. (1-byte formats have no fp16 field: their pairs
    span two blocks, and random bytes cover all their values anyway.)"""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_random + BLOCKS_PER_SPECIAL * len(SPECIAL_F16), fmt.block_bytes), dtype=np.uint8)
    pairs = raw[n_random:].reshape(-1).view(np.uint16)  # a view: writes land in `raw`
    block_of_pair = 2 * np.arange(pairs.size) // fmt.block_bytes
    special = np.repeat(np.array(SPECIAL_F16, dtype=np.uint16), BLOCKS_PER_SPECIAL)[block_of_pair]
    pairs[...] = np.where(rng.random(pairs.shape) < 0.5, special, pairs)
    return raw


def assert_same_floats(actual, expected, nan_payloads=True):
    """Same shape, dtype and bits; with `nan_payloads=False` NaNs need only be NaN in both."""
    actual = actual.cpu().numpy()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = {2: np.int16, 4: np.int32}[expected.itemsize]
    actual_bits, expected_bits = actual.view(bits), expected.view(bits)
    if nan_payloads:
        assert np.array_equal(actual_bits, expected_bits), np.argwhere(actual_bits != expected_bits)[:5]
    else:
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(actual), nan)
        assert np.array_equal(actual_bits[~nan], expected_bits[~nan])


def nan_payloads_match(name, device):
    return device == "cpu" and name not in NAN_PAYLOADS_DIFFER


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_bit_identical(name, device):
    fmt = get_format(name)
    raw = random_raw(fmt, 2048 if fmt.is_quantized else 32768, seed=len(name) * 1000 + fmt.block_bytes)
    raw = raw.reshape(-1, 2, 2 * fmt.block_bytes)  # two leading axes, several blocks per row
    expected = reference.dequantize(raw, name)
    actual = torch_codecs.dequantize(torch.from_numpy(raw).to(device), name)
    assert actual.device.type == device
    assert_same_floats(actual, expected, nan_payloads_match(name, device))


def data(kind, width, seed):
    """Rows of float32 test input, several blocks each."""
    rng = np.random.default_rng(seed)
    shape = (32, width)
    if kind == "normal":
        x = rng.standard_normal(shape) * 0.02
    elif kind == "heavy_tailed":
        x = rng.standard_cauchy(shape) * 0.02
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "constant":  # one random constant per 32 elements, so blocks of any size are constant or two-valued
        x = np.repeat(rng.standard_normal((32, width // 32)), 32, axis=-1)
    elif kind == "tiny":  # scales far below fp16's range (stored as 0), and float32 subnormals (1/scale = inf)
        x = rng.standard_normal(shape) * np.where(rng.random((32, 1)) < 0.5, 1e-30, 1e-40)
    elif kind == "halves":  # rounding ties: with a 127 in every block Q8_0's scale is exactly 1
        x = rng.integers(-100, 100, shape) + 0.5
        x[:, ::32] = 127
    elif kind == "magnitude_ties":  # blocks whose max and min have the same magnitude: the first one sets the scale
        x = rng.integers(-4, 5, shape).astype(np.float64)
    elif kind == "signed_zeros":  # zero blocks of +0.0 and -0.0 in random order: the first zero's sign is stored
        x = np.where(rng.random(shape) < 0.5, 0.0, -0.0)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "zeros", "constant", "tiny", "halves", "magnitude_ties",
                                  "signed_zeros"])
@pytest.mark.parametrize("name", FORMATS)
def test_quantize_byte_identical(name, kind, device):
    fmt = get_format(name)
    x = data(kind, 4 * fmt.block_size, seed=len(name) + len(kind))
    expected = reference.quantize(x, name)
    actual = torch_codecs.quantize(torch.from_numpy(x).to(device), name)
    assert actual.device.type == device and actual.dtype == torch.uint8
    assert np.array_equal(actual.cpu().numpy(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [name for name, fmt in FORMATS.items() if not fmt.is_quantized])
def test_float_quantizers_keep_specials(name, device):
    x = np.array([[np.inf, -np.inf, np.nan, -np.nan, -0.0, 1e-45, 6e-8, 3.4e38, 65504.0, 65520.0, 1 + 2**-8,
                   1 + 3 * 2**-8]], dtype=np.float32)
    signalling_nans = np.array([[0x7F800001, 0xFFA00000, 0x7FBFFFFF]], dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, signalling_nans], axis=-1)
    expected = reference.quantize(x, name)
    actual = torch_codecs.quantize(torch.from_numpy(x).to(device), name)
    if name == "F16":  # bytes compared as fp16, NaN-ness only (see NAN_PAYLOADS_DIFFER)
        assert_same_floats(actual.view(torch.float16), expected.view(np.float16), nan_payloads=False)
    else:
        assert np.array_equal(actual.cpu().numpy(), expected)


@pytest.mark.parametrize("name", FORMATS)
def test_leading_dims_and_dtypes(name):
    fmt = get_format(name)
    x = np.random.default_rng(3).standard_normal((2, 3, 2 * fmt.block_size)).astype(np.float32)
    raw = torch_codecs.quantize(torch.from_numpy(x).to(torch.float64), name)  # any float input, read as float32
    assert raw.shape == (2, 3, fmt.row_bytes(2 * fmt.block_size))
    assert np.array_equal(raw.numpy(), reference.quantize(x, name))
    expected = torch.from_numpy(reference.dequantize(raw.numpy(), name))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        y = torch_codecs.dequantize(raw, name, dtype=dtype)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y, expected.to(dtype))  # computed in float32, then cast


@pytest.mark.parametrize("name", FORMATS)
def test_empty_input(name):
    fmt = get_format(name)
    raw = torch_codecs.quantize(torch.zeros(0, 2 * fmt.block_size), name)
    assert raw.shape == (0, 2 * fmt.block_bytes)
    assert torch_codecs.dequantize(raw, name).shape == (0, 2 * fmt.block_size)


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_reads_unaligned_and_strided_bytes(name):
    fmt = get_format(name)
    raw = random_raw(fmt, 64, seed=5).reshape(8, -1)
    expected = reference.dequantize(raw, name)
    unaligned = torch.from_numpy(np.concatenate([[0], raw.ravel()]).astype(np.uint8))[1:].view(raw.shape)
    assert unaligned.is_contiguous() and unaligned.storage_offset() == 1  # fields at odd addresses: no views on them
    strided = torch.from_numpy(np.pad(raw, ((0, 0), (1, 0))))[:, 1:]  # rows not contiguous with each other
    for view in (unaligned, strided):
        assert_same_floats(torch_codecs.dequantize(view, name), expected, nan_payloads_match(name, "cpu"))


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_in_steps_is_bit_identical(name, monkeypatch):
    """Large weights are decoded a step at a time into one result (float32 directly, other dtypes through a float32
    step buffer): steps of 3 blocks over 32 blocks leave a partial last step."""
    fmt = get_format(name)
    monkeypatch.setitem(torch_codecs._DEQUANTIZE_CHUNK_ELEMENTS, "cpu", 3 * fmt.block_size)
    raw = random_raw(fmt, 32, seed=11).reshape(4, -1)
    expected = reference.dequantize(raw, name)
    assert_same_floats(torch_codecs.dequantize(torch.from_numpy(raw), name), expected, nan_payloads_match(name, "cpu"))
    for dtype in (torch.bfloat16, torch.float16):
        actual = torch_codecs.dequantize(torch.from_numpy(raw), name, dtype)
        cast = torch.from_numpy(expected).to(dtype)
        assert actual.dtype == dtype and torch.equal(actual.isnan(), cast.isnan())
        assert torch.equal(actual[~cast.isnan()], cast[~cast.isnan()])


@pytest.mark.parametrize("name, dtype", [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_float_formats_in_their_own_dtype_are_views(name, dtype):
    raw = torch.from_numpy(random_raw(get_format(name), 64, seed=2).reshape(2, -1))
    assert torch_codecs.dequantize(raw, name, dtype).untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()


def test_huge_page_output_is_an_ordinary_tensor():
    from kernels.torch_codecs import huge_pages

    t = huge_pages.empty((3, huge_pages.SMALLEST_ADVISED // 3 + 5), torch.float32, torch.device("cpu"))
    assert t.shape == (3, huge_pages.SMALLEST_ADVISED // 3 + 5) and t.is_contiguous()
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()


@pytest.mark.parametrize("call, message", [
    (lambda: torch_codecs.dequantize(torch.zeros(1, 18, dtype=torch.uint8), "Q4_9"), "unknown weight format 'Q4_9'"),
    (lambda: torch_codecs.quantize(torch.zeros(1, 32), "Q4_O"), "unknown weight format 'Q4_O'"),
    (lambda: torch_codecs.dequantize(torch.zeros(1, 20, dtype=torch.uint8), "Q4_0"),
     "20 bytes is not a whole number of 18-byte"),
    (lambda: torch_codecs.quantize(torch.zeros(1, 100), "Q4_K"), "100 elements is not a whole number of 256"),
    (lambda: torch_codecs.dequantize(torch.zeros(1, 18), "Q4_0"), "raw data must be uint8 bytes, got torch.float32"),
    (lambda: torch_codecs.dequantize(torch.tensor(7, dtype=torch.uint8), "Q4_0"), "at least one axis"),
    (lambda: torch_codecs.dequantize(torch.zeros(1, 18, dtype=torch.uint8), "Q4_0", dtype=torch.int32),
     "output dtype must be floating point"),
    (lambda: torch_codecs.quantize(torch.zeros(1, 32, dtype=torch.int32), "Q8_0"), "must be floating point"),
    (lambda: torch_codecs.quantize(torch.tensor(1.0), "F16"), "at least one axis"),
    (lambda: torch_codecs.quantize(torch.tensor([[1.0] * 31 + [float("nan")]]), "Q8_0"), "inf or nan"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_k_quant_search_without_a_compiler_falls_back_to_eager(monkeypatch):
    from kernels.torch_codecs import kquants

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kquants, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    x = data("heavy_tailed", 512, seed=3)
    with pytest.warns(UserWarning, match="torch.compile is unavailable"):
        raw = torch_codecs.quantize(torch.from_numpy(x), "Q4_K")
    assert kquants._COMPILED[kquants._qkx2_step] is kquants._qkx2_step
    assert np.array_equal(raw.numpy(), reference.quantize(x, "Q4_K"))


def test_qtensor_stores_the_canonical_format_name():
    from kernels import QTensor

    assert QTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (1, 32)).format == "Q4_0"
