"""Large CPU outputs backed by transparent huge pages.

A fresh tensor of tens of MB gets its own memory mapping from the C allocator, and the kernel then maps it one 4 KiB
page at a time as it is first written: for a 3072 x 3072 float32 weight that is ~9,400 page faults, which took longer
(~15 ms on the 2-core VM) than decoding the weight. Advising the kernel to back the mapping with 2 MiB pages
(`madvise(MADV_HUGEPAGE)`, what torch's own THP_MEM_ALLOC_ENABLE=1 does for every allocation) cuts that to a few
dozen faults. The advice only changes how memory is mapped, never its contents; where it is unavailable (not Linux,
THP disabled) the tensor is a plain `torch.empty`.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14  # linux/mman-common.h, the same on every architecture
SMALLEST_ADVISED = 4 * HUGE_PAGE  # below this the unaligned ends would be most of the buffer

_madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`, on huge pages where it is a large CPU tensor."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if _madvise is not None and tensor.device.type == "cpu" and nbytes >= SMALLEST_ADVISED:
        start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside the tensor
        end = (tensor.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)  # a hint: failure is harmless
    return tensor
