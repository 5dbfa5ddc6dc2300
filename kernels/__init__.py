"""Weight formats and their kernels: `formats` (the registry), `reference` (numpy ground truth), `torch_codecs`
(torch dequantizers/quantizers, the non-Triton path) and `triton` (fused GPU kernels)."""

from kernels.formats import FORMATS, Format, get_format
from kernels.qtensor import QTensor

__all__ = ["FORMATS", "Format", "QTensor", "get_format"]
