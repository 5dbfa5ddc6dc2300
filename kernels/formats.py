"""The one table of weight formats.

Every other module (reference kernels, torch kernels, Triton kernels, loaders, converter, benchmarks) looks formats
up here instead of branching on names. A format is one `Format` entry plus, in its family's reference module, a
`dequantize_<name>` / `quantize_<name>` pair working on whole blocks.

Each block's fields (name and size, in byte order) are listed here and checked against its byte count, as ggml's
`static_assert`s check its block structs; the Triton decode takes its byte offsets from them (`Format.offset`). How the
bits inside each field map to elements is written down next to the reference code in `kernels/reference/<family>.py`.
The code books (NF4, IQ4) and block constants shared by the reference, the torch codecs and the Triton decode are
defined here too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    ggml_type: int | None  # GGML type id; None when GGUF cannot store the format
    block_size: int  # elements per block (1 for plain floats)
    block_bytes: int  # bytes per block
    family: str  # module in kernels/reference holding its codecs: floats, legacy, kquants, iquants, nf4
    fields: tuple[tuple[str, int], ...]  # (name, bytes) of the block's fields in byte order (ggml's struct members)
    # How the block's codes are ordered in its last field, for the kernels' planes layout (kernels/repack.py):
    # "int8" one code a byte, "halves" ggml's 4-bit order (low nibbles = the block's first half), "high_first"
    # bitsandbytes' (byte i = element 2i high, 2i+1 low), "q6_k" ... "q2_k" the K-quants' code fields in ggml's
    # interleaved orders (kernels/repack.py, CODE_FIELDS); None: the format has no planes layout.
    codes: str | None = None

    def __post_init__(self):
        if sum(size for _, size in self.fields) != self.block_bytes:
            raise AssertionError(f"{self.name}: fields {self.fields} do not add up to {self.block_bytes} bytes")

    def offset(self, field: str) -> int:
        """Byte offset of `field` within a block."""
        position = 0
        for name, size in self.fields:
            if name == field:
                return position
            position += size
        raise KeyError(f"{self.name} has no field {field!r}; fields: {[name for name, _ in self.fields]}")

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    @property
    def in_gguf(self) -> bool:
        return self.ggml_type is not None

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    def row_bytes(self, n: int) -> int:
        """Bytes taken by `n` elements; `n` must be a whole number of blocks."""
        if n % self.block_size:
            raise ValueError(f"{self.name}: {n} elements is not a whole number of {self.block_size}-element blocks")
        return n // self.block_size * self.block_bytes

    def elements(self, row_bytes: int) -> int:
        """Elements held by `row_bytes` bytes; the bytes must be a whole number of blocks."""
        if row_bytes % self.block_bytes:
            raise ValueError(f"{self.name}: {row_bytes} bytes is not a whole number of {self.block_bytes}-byte blocks")
        return row_bytes // self.block_bytes * self.block_size


QK_K = 256  # elements of a K-quant (and IQ4_XS) super-block
QK4_NL = 32  # elements of an IQ4_NL block, and of each IQ4_XS sub-block
NF4_BLOCK = 64  # weights sharing one absmax in bitsandbytes' NF4

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("F32", 0, 1, 4, "floats", (("value", 4),)),
        Format("F16", 1, 1, 2, "floats", (("value", 2),)),
        Format("BF16", 30, 1, 2, "floats", (("value", 2),)),
        # float8 e4m3fn (FP8 checkpoints), one byte per weight; an optional per-tensor scale lives in the QTensor.
        Format("F8_E4M3", None, 1, 1, "floats", (("value", 1),)),
        Format("Q8_0", 8, 32, 34, "legacy", (("d", 2), ("qs", 32)), "int8"),
        Format("Q6_K", 14, QK_K, 210, "kquants", (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)), "q6_k"),
        Format("Q5_K", 13, QK_K, 176, "kquants", (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)),
               "q5_k"),
        Format("Q5_1", 7, 32, 24, "legacy", (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)), "halves"),
        Format("Q5_0", 6, 32, 22, "legacy", (("d", 2), ("qh", 4), ("qs", 16)), "halves"),
        Format("Q4_K", 12, QK_K, 144, "kquants", (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)), "q4_k"),
        Format("Q4_1", 3, 32, 20, "legacy", (("d", 2), ("m", 2), ("qs", 16)), "halves"),
        Format("Q4_0", 2, 32, 18, "legacy", (("d", 2), ("qs", 16)), "halves"),
        Format("Q3_K", 11, QK_K, 110, "kquants", (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)), "q3_k"),
        Format("Q2_K", 10, QK_K, 84, "kquants", (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)), "q2_k"),
        Format("IQ4_NL", 20, QK4_NL, 18, "iquants", (("d", 2), ("qs", 16)), "halves"),
        Format("IQ4_XS", 23, QK_K, 136, "iquants", (("d", 2), ("scales_h", 2), ("scales_l", 4), ("qs", 128)),
               "iq4_xs"),
        # bitsandbytes NF4 as one self-contained block: fp32 absmax, then 32 bytes of codes (see reference/nf4.py).
        Format("NF4", None, NF4_BLOCK, 36, "nf4", (("absmax", 4), ("qs", 32)), "high_first"),
    )
}

# Code books read by the reference, the torch codecs and the Triton decode alike.
# bitsandbytes.functional.get_4bit_type("nf4"): the float32 roundings of its doubles, ascending.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# ggml's kvalues_iq4nl: the 16 non-uniform int8 levels of IQ4_NL and IQ4_XS codes.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# bitsandbytes' double quantization: absmax values sharing one nested absmax.
NF4_NESTED_BLOCK = 256
# bitsandbytes clamps absmax to this (a float32 subnormal) before taking its reciprocal, so an all-zero block gets
# code 7 (0.0) everywhere; blocks of tiny values are scaled by 1 / 1e-38 instead of their own absmax.
NF4_SMALLEST_ABSMAX_DIVISOR = 1e-38

GGUF_FORMATS = tuple(name for name, f in FORMATS.items() if f.in_gguf)


def get_format(name: str) -> Format:
    """The format called `name`, in any letter case ("q4_k" as typed on a command line)."""
    try:
        return FORMATS[name.upper()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown weight format {name!r}; known formats: {', '.join(FORMATS)}") from None


def format_from_ggml_type(type_id: int) -> Format:
    for f in FORMATS.values():
        if f.ggml_type == type_id:
            return f
    raise ValueError(f"unsupported GGML type id {type_id}; supported: "
                     + ", ".join(f"{f.name}={f.ggml_type}" for f in FORMATS.values() if f.in_gguf))
