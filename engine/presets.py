"""The converter's presets: which format every Flux tensor is stored in (`python -m engine.convert --type`).

A module of its own, free of side effects, so that readers of the table (the memory planner, benchmarks) need not
import the converter. What the presets mean and why is in `engine.convert`'s docstring.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gguf import LlamaFileType

from kernels.formats import get_format

log = logging.getLogger("engine.presets")


# Non-block 2-D weights that city96's K-quant files keep in F32: the layers reading the model's inputs and the final
# projection (ComfyUI-GGUF tools/lcpp.patch, img_tensor_get_type, "Tensors to keep in FP32 precision"). The patch
# makes every other non-block 2-D weight F16; llama-quantize leaves 1-D tensors as tools/convert.py wrote them, F32.
F32_LAYERS = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")


@dataclass(frozen=True)
class Preset:
    block: str  # format of the 2-D weights inside double/single blocks
    qkv: str  # format of double_blocks.*.{img,txt}_attn.qkv.weight
    matrix: str  # format of the other 2-D weights (and of block weights whose rows are not whole blocks)
    vector: str  # format of 1-D tensors: biases, norm scales
    file_type: LlamaFileType  # general.file_type
    f32_layers: tuple[str, ...] = ()  # name prefixes of 2-D weights stored F32 instead of `matrix`


# The one table of presets (order: largest to smallest, then the unquantized ones). The K-quant and IQ presets follow
# city96's llama.cpp-quantized files (F32_LAYERS F32, other 2-D F16, 1-D F32); the legacy ones his Python-quantized
# files, which store everything unquantized in F16. Their sizes then match the published files' (tests/test_memory.py).
_K = dict(matrix="F16", vector="F32", f32_layers=F32_LAYERS)
_LEGACY = dict(matrix="F16", vector="F16")
PRESETS: dict[str, Preset] = {
    "Q8_0": Preset("Q8_0", "Q8_0", file_type=LlamaFileType.MOSTLY_Q8_0, **_LEGACY),
    "Q6_K": Preset("Q6_K", "Q6_K", file_type=LlamaFileType.MOSTLY_Q6_K, **_K),
    "Q5_K_M": Preset("Q5_K", "Q6_K", file_type=LlamaFileType.MOSTLY_Q5_K_M, **_K),
    "Q5_K_S": Preset("Q5_K", "Q5_K", file_type=LlamaFileType.MOSTLY_Q5_K_S, **_K),
    "Q5_1": Preset("Q5_1", "Q5_1", file_type=LlamaFileType.MOSTLY_Q5_1, **_LEGACY),
    "Q5_0": Preset("Q5_0", "Q5_0", file_type=LlamaFileType.MOSTLY_Q5_0, **_LEGACY),
    "Q4_K_M": Preset("Q4_K", "Q5_K", file_type=LlamaFileType.MOSTLY_Q4_K_M, **_K),
    "Q4_K_S": Preset("Q4_K", "Q4_K", file_type=LlamaFileType.MOSTLY_Q4_K_S, **_K),
    "Q4_1": Preset("Q4_1", "Q4_1", file_type=LlamaFileType.MOSTLY_Q4_1, **_LEGACY),
    "Q4_0": Preset("Q4_0", "Q4_0", file_type=LlamaFileType.MOSTLY_Q4_0, **_LEGACY),
    "IQ4_NL": Preset("IQ4_NL", "IQ4_NL", file_type=LlamaFileType.MOSTLY_IQ4_NL, **_K),
    "IQ4_XS": Preset("IQ4_XS", "IQ4_XS", file_type=LlamaFileType.MOSTLY_IQ4_XS, **_K),
    "Q3_K_M": Preset("Q3_K", "Q4_K", file_type=LlamaFileType.MOSTLY_Q3_K_M, **_K),
    "Q3_K_S": Preset("Q3_K", "Q3_K", file_type=LlamaFileType.MOSTLY_Q3_K_S, **_K),
    "Q2_K": Preset("Q2_K", "Q2_K", file_type=LlamaFileType.MOSTLY_Q2_K, **_K),
    "F16": Preset("F16", "F16", "F16", "F16", LlamaFileType.MOSTLY_F16),
    "BF16": Preset("BF16", "BF16", "BF16", "BF16", LlamaFileType.MOSTLY_BF16),
}

BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
QKV_SUFFIX = "attn.qkv.weight"  # what city96's llama.cpp patch matches; only double blocks have such tensors


def is_block_weight(name: str, shape) -> bool:
    """The tensors the published files quantize: 2-D weights inside double and single blocks."""
    return name.startswith(BLOCK_PREFIXES) and name.endswith(".weight") and len(shape) == 2


def tensor_format(name: str, shape, preset: Preset) -> str:
    """The format `name` (of logical `shape`) is stored in under `preset`."""
    if len(shape) < 2:
        return preset.vector
    if not is_block_weight(name, shape):
        return "F32" if name.startswith(preset.f32_layers) else preset.matrix
    fmt = preset.qkv if name.endswith(QKV_SUFFIX) else preset.block
    if shape[-1] % get_format(fmt).block_size:
        log.warning("%s %s: rows of %d are not whole %s blocks; stored as %s", name, list(shape), shape[-1], fmt,
                    preset.matrix)
        return preset.matrix
    return fmt
