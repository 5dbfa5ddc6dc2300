"""The one table of weight formats.

Every other module (reference kernels, torch kernels, Triton kernels, loaders, converter, benchmarks) looks formats
up here instead of branching on names. A format is one `Format` entry plus, in its family's reference module, a
`dequantize_<name>` / `quantize_<name>` pair working on whole blocks.

Byte layouts of each block are written down next to their code in `kernels/reference/<family>.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    ggml_type: int | None  # GGML type id; None when GGUF cannot store the format
    block_size: int  # elements per block (1 for plain floats)
    block_bytes: int  # bytes per block
    symmetric: bool  # True: x = scale * code; False: x = scale * code - min (an offset per (sub-)block)
    family: str  # module in kernels/reference holding its codecs: floats, legacy, kquants, iquants, nf4

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


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("F32", 0, 1, 4, True, "floats"),
        Format("F16", 1, 1, 2, True, "floats"),
        Format("BF16", 30, 1, 2, True, "floats"),
        # float8 e4m3fn (FP8 checkpoints), one byte per weight; an optional per-tensor scale lives in the QTensor.
        Format("F8_E4M3", None, 1, 1, True, "floats"),
        Format("Q8_0", 8, 32, 34, True, "legacy"),
        Format("Q6_K", 14, 256, 210, True, "kquants"),
        Format("Q5_K", 13, 256, 176, False, "kquants"),
        Format("Q5_1", 7, 32, 24, False, "legacy"),
        Format("Q5_0", 6, 32, 22, True, "legacy"),
        Format("Q4_K", 12, 256, 144, False, "kquants"),
        Format("Q4_1", 3, 32, 20, False, "legacy"),
        Format("Q4_0", 2, 32, 18, True, "legacy"),
        Format("Q3_K", 11, 256, 110, True, "kquants"),
        Format("Q2_K", 10, 256, 84, False, "kquants"),
        Format("IQ4_NL", 20, 32, 18, True, "iquants"),
        Format("IQ4_XS", 23, 256, 136, True, "iquants"),
        # bitsandbytes NF4 as one self-contained block: fp32 absmax, then 32 bytes of codes (see reference/nf4.py).
        Format("NF4", None, 64, 36, True, "nf4"),
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

GGUF_FORMATS = tuple(name for name, f in FORMATS.items() if f.in_gguf)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown weight format {name!r}; known formats: {', '.join(FORMATS)}") from None


def format_from_ggml_type(type_id: int) -> Format:
    for f in FORMATS.values():
        if f.ggml_type == type_id:
            return f
    raise ValueError(f"unsupported GGML type id {type_id}; supported: "
                     + ", ".join(f"{f.name}={f.ggml_type}" for f in FORMATS.values() if f.in_gguf))
