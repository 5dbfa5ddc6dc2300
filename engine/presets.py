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


@dataclass(frozen=True)
class Preset:
    block: str  # format of the 2-D weights inside double/single blocks
    qkv: str  # format of double_blocks.*.{img,txt}_attn.qkv.weight
    leftover: str  # format of every other tensor
    file_type: LlamaFileType  # general.file_type


# The one table of presets (order: largest to smallest, then the unquantized ones).
PRESETS: dict[str, Preset] = {
    "Q8_0": Preset("Q8_0", "Q8_0", "F16", LlamaFileType.MOSTLY_Q8_0),
    "Q6_K": Preset("Q6_K", "Q6_K", "F32", LlamaFileType.MOSTLY_Q6_K),
    "Q5_K_M": Preset("Q5_K", "Q6_K", "F32", LlamaFileType.MOSTLY_Q5_K_M),
    "Q5_K_S": Preset("Q5_K", "Q5_K", "F32", LlamaFileType.MOSTLY_Q5_K_S),
    "Q5_1": Preset("Q5_1", "Q5_1", "F16", LlamaFileType.MOSTLY_Q5_1),
    "Q5_0": Preset("Q5_0", "Q5_0", "F16", LlamaFileType.MOSTLY_Q5_0),
    "Q4_K_M": Preset("Q4_K", "Q5_K", "F32", LlamaFileType.MOSTLY_Q4_K_M),
    "Q4_K_S": Preset("Q4_K", "Q4_K", "F32", LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_1": Preset("Q4_1", "Q4_1", "F16", LlamaFileType.MOSTLY_Q4_1),
    "Q4_0": Preset("Q4_0", "Q4_0", "F16", LlamaFileType.MOSTLY_Q4_0),
    "IQ4_NL": Preset("IQ4_NL", "IQ4_NL", "F32", LlamaFileType.MOSTLY_IQ4_NL),
    "IQ4_XS": Preset("IQ4_XS", "IQ4_XS", "F32", LlamaFileType.MOSTLY_IQ4_XS),
    "Q3_K_M": Preset("Q3_K", "Q4_K", "F32", LlamaFileType.MOSTLY_Q3_K_M),
    "Q3_K_S": Preset("Q3_K", "Q3_K", "F32", LlamaFileType.MOSTLY_Q3_K_S),
    "Q2_K": Preset("Q2_K", "Q2_K", "F32", LlamaFileType.MOSTLY_Q2_K),
    "F16": Preset("F16", "F16", "F16", LlamaFileType.MOSTLY_F16),
    "BF16": Preset("BF16", "BF16", "BF16", LlamaFileType.MOSTLY_BF16),
}

BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
QKV_SUFFIX = "attn.qkv.weight"  # what city96's llama.cpp patch matches; only double blocks have such tensors


def is_block_weight(name: str, shape) -> bool:
    """The tensors the published files quantize: 2-D weights inside double and single blocks."""
    return name.startswith(BLOCK_PREFIXES) and name.endswith(".weight") and len(shape) == 2


def tensor_format(name: str, shape, preset: Preset) -> str:
    """The format `name` (of logical `shape`) is stored in under `preset`."""
    if not is_block_weight(name, shape):
        return preset.leftover
    fmt = preset.qkv if name.endswith(QKV_SUFFIX) else preset.block
    if shape[-1] % get_format(fmt).block_size:
        log.warning("%s %s: rows of %d are not whole %s blocks; stored as %s", name, list(shape), shape[-1], fmt,
                    preset.leftover)
        return preset.leftover
    return fmt
