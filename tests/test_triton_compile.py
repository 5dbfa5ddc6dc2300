"""Every kernel must compile for the GPUs the files are made for, without register spills and within shared memory.

A representative subset here (each format once on sm_86, the tightest shared-memory budget; every tile config, the
split-K kernels (masked, and for planes tiles inside the weight unmasked) and the dequantize kernel for the heaviest
decoders on every architecture; IQ4's code-book decode to bf16 and the split-K decode of 4-bit codes in the form of
each architecture (`ops.split_k_form`) on every architecture; the integer-dot GEMV and its x rounding on sm_80
and sm_90); `python -m bench.compile_check` runs the full sweep."""

import os

from bench.compile_check import SHARED_LIMIT, problems, run
from kernels.repack import has_planes
from kernels.triton.decode import KERNEL_FORMATS
from kernels.triton.ops import INT_DOT_FORMATS, gemm_configs

# the most registers in the full sweep: the blocks GEMM, split-K and dequantize kernels, the planes FMA GEMV
HEAVY = (("Q5_K", "blocks"), ("NF4", "planes"), ("Q5_K", "planes"), ("Q6_K", "planes"))


def subset():
    jobs = [("qmm", fmt, "fp16", 0, 86, "blocks") for fmt in KERNEL_FORMATS]
    jobs += [("qmm", fmt, "fp16", 0, 86, "planes") for fmt in KERNEL_FORMATS if has_planes(fmt)]
    for cc in SHARED_LIMIT:
        for fmt, layout in HEAVY:
            jobs += [("qmm", fmt, dtype, i, cc, layout) for dtype in ("bf16", "fp32")
                     for i in range(len(gemm_configs(dtype, layout, cc)))]
            jobs += [(kernel, fmt, "bf16", even, cc, layout) for kernel in ("gemv", "qmv")
                     for even in range(1 + (layout == "planes"))]
            jobs.append(("dequant", fmt, "fp16", 0, cc, layout))
        jobs += [("qmv", "IQ4_XS", "bf16", 1, cc, "planes"), ("qmv", "Q4_K", "bf16", 1, cc, "planes")]
    # the integer-dot GEMV (dp2a, sm_61 and up) of each of its formats, masked, and the kernel rounding x for it in
    # both orders, on the oldest and newest
    jobs += [("gemv", fmt, "bf16", 0, cc, "planes") for fmt in sorted(INT_DOT_FORMATS) for cc in (80, 90)]
    jobs += [("quantize_x", fmt, "bf16", 0, cc, "planes") for fmt in ("Q2_K", "IQ4_NL") for cc in (80, 90)]
    # the split-K kernel's f16 weights with fp16 x (`ops.uses_half_weights`; IQ4_XS with bf16 x above), masked, its
    # integer tiles (`ops.uses_int_tiles`, 256 deep) and NF4's level tiles (`ops.uses_level_tiles`), masked and not
    jobs += [("qmv", "IQ4_NL", "fp16", 0, cc, "planes") for cc in (80, 90)]
    jobs += [("qmv", fmt, "bf16", even, cc, "planes") for fmt in ("Q3_K", "Q2_K", "NF4") for even in (0, 1)
             for cc in (80, 90)]
    # the kernel preparing their bf16 x, in its four forms
    jobs += [("split_k_x", fmt, "bf16", 0, cc, "planes") for fmt in ("IQ4_NL", "Q3_K", "Q2_K", "NF4")
             for cc in (80, 90)]
    return jobs


def test_kernels_compile_for_sm80_to_sm90():
    rows = run(subset(), workers=os.cpu_count() or 1)
    failures = [(row["kernel"], row["format"], row["layout"], row["dtype"], row["config"], row["cc"], problems(row))
                for row in rows if problems(row)]
    assert not failures, failures
