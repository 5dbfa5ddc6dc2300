"""Compile every Triton kernel × format × activation dtype × tile config for real GPUs, without one.

`python -m bench.compile_check [--archs sm_80,sm_86,sm_89,sm_90] [--workers N]` prints a table and fails (exit 1) on a
compile error, a register spill or shared memory above the architecture's limit. Spills come from running Triton's
bundled ptxas with -v on the generated PTX. Each kernel is compiled for the worst case a launch can meet: pointers
aligned (`POINTER_ARGUMENTS`), no size marked a multiple of 16 (odd M, N; the kernels state K's and the planes row
length's multiples themselves). tests/test_triton_compile.py runs a representative subset in CI.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")
LAYOUTS = ("blocks", "planes")


def jobs(archs=tuple(SHARED_LIMIT), formats=None, dtypes=DTYPES, layouts=LAYOUTS):
    """(kernel, format, dtype, config index, cc, layout) for everything that can be launched (in `layouts`)."""
    from kernels.repack import has_planes
    from kernels.triton.decode import KERNEL_FORMATS
    from kernels.triton.ops import gemm_configs, prepares_split_k_x, uses_int_dots

    for cc in archs:
        for fmt in formats or KERNEL_FORMATS:
            for layout in (layout for layout in layouts if layout == "blocks" or has_planes(fmt)):
                yield ("dequant", fmt, "fp16", 0, cc, layout)
                if uses_int_dots(fmt, layout):  # x to 16-bit integers, in fmt's order
                    yield from (("quantize_x", fmt, dtype, 0, cc, layout) for dtype in dtypes)
                if "bf16" in dtypes and prepares_split_k_x(fmt, layout, "bf16"):  # the split-K kernel's x
                    yield ("split_k_x", fmt, "bf16", 0, cc, layout)
                for dtype in dtypes:
                    # config index 1: the split-K kernels for weights their tiles divide (EVEN: no masked weight
                    # loads; planes only)
                    for kernel in ("gemv", "qmv"):
                        yield from ((kernel, fmt, dtype, even, cc, layout) for even in range(1 + (layout == "planes")))
                    for i in range(len(gemm_configs(dtype, layout, cc))):
                        yield ("qmm", fmt, dtype, i, cc, layout)


_MATMUL_POINTERS = ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "tables_ptr")
# Pointer arguments per kernel. Every one is 16-byte aligned when quant_linear launches it (torch's allocations are;
# an activation that is not gets copied), and Triton's JIT specialises on that, so every compilation here does too.
POINTER_ARGUMENTS = {"qmm": _MATMUL_POINTERS, "qmv": ("x_ptr", "x_shifts_ptr", "x_sums_ptr") + _MATMUL_POINTERS[1:],
                     "gemv": ("x_ptr", "x_scale_ptr", "x_sum_ptr") + _MATMUL_POINTERS[1:],
                     "dequant": ("w_ptr", "out_ptr", "tables_ptr"),
                     "quantize_x": ("x_ptr", "xq_ptr", "scale_ptr", "sum_ptr", "y_ptr"),
                     "split_k_x": ("x_ptr", "xo_ptr", "x_shifts_ptr", "x_sums_ptr", "y_ptr")}


def _ptxas_stats(ptx: str, cc: int) -> tuple[int, int]:
    """(registers, spill bytes) that ptxas -v reports, run as Triton runs it for this architecture."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    result = subprocess.run([get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", "-",
                             "-o", os.devnull], input=ptx.encode(), capture_output=True, check=True)
    report = result.stderr.decode()
    regs = max(int(r) for r in re.findall(r"Used (\d+) registers", report))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return regs, spills


def compile_kernel(kernel_name: str, fmt: str, dtype: str, config_index: int, cc: int, layout: str = "blocks",
                   divisible_by_16: tuple[str, ...] = ()):
    """Triton's compiled kernel (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata`) for one job, as launched by
    kernels.triton.ops for a weight in `layout`; `divisible_by_16` names the arguments to specialise as the JIT does
    at run time for values (pointers, sizes) that are multiples of 16."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.triton import int_gemv, qmatmul
    from kernels.triton.decode import FORMAT_IDS
    from kernels.triton.ops import (DEQUANT_CONFIG, GEMV_CONFIGS, QUANTIZE_X_BLOCK, SPLIT_K_X_BLOCK, gemm_configs,
                                    prepares_split_k_x, split_k_config, split_k_form, transposes_x,
                                    uses_half_weights, uses_half_x, uses_int_dots, uses_int_tiles, uses_level_tiles)

    act = f"*{dtype}"
    tl_dtype = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[dtype]
    common = {"FMT": FORMAT_IDS[fmt], "PLANES": layout == "planes"}
    options = {}
    if kernel_name == "quantize_x":
        kernel, num_warps, num_stages = int_gemv.quantize_x_kernel, 4, 1
        signature = {"x_ptr": act, "xq_ptr": "*i16", "scale_ptr": "*fp32", "sum_ptr": "*i32", "y_ptr": "*fp32",
                     "N": "i32", "K": "i32"}
        constexprs = {"TRANSPOSE_4X4": transposes_x(fmt), "BLOCK": QUANTIZE_X_BLOCK}
    elif kernel_name == "split_k_x":
        kernel, num_warps, num_stages = qmatmul.split_k_x_kernel, 4, 1
        half = uses_half_x(fmt, layout, dtype)
        signature = {"x_ptr": act, "xo_ptr": "*fp16" if half else act, "x_shifts_ptr": "*i32" if half else "*fp32",
                     "x_sums_ptr": "*bf16" if fmt == "Q2_K" else "*fp32", "y_ptr": "*fp32", "N": "i32", "K": "i32",
                     "k_per_split": "i32", "n_per_split": "i32"}
        constexprs = {"FMT": FORMAT_IDS[fmt], "HALF_X": half, "BLOCK": SPLIT_K_X_BLOCK}
    elif kernel_name == "dequant":
        kernel, num_warps, num_stages = qmatmul.dequant_kernel, DEQUANT_CONFIG["num_warps"], 1
        options["enable_fp_fusion"] = DEQUANT_CONFIG["enable_fp_fusion"]
        signature = {"w_ptr": "*u8", "out_ptr": act, "tables_ptr": "*fp32", "N": "i32", "K": "i32", "row_bytes": "i32"}
        constexprs = common | {k: v for k, v in DEQUANT_CONFIG.items() if k.startswith("BLOCK")}
    elif kernel_name == "gemv":
        kernel, config = qmatmul.gemv_kernel, GEMV_CONFIGS[layout]
        num_warps, num_stages = config["num_warps"], config["num_stages"]
        int_dots = uses_int_dots(fmt, layout)
        signature = {"x_ptr": "*i16" if int_dots else act, "x_scale_ptr": "*fp32" if int_dots else act,
                     "x_sum_ptr": "*i32" if int_dots else act, "w_ptr": "*u8", "bias_ptr": act, "y_ptr": "*fp32",
                     "tables_ptr": "*fp32", "N": "i32", "K": "i32", "row_bytes": "i32", "k_per_split": "i32"}
        constexprs = common | {"HAS_BIAS": True, "EVEN": bool(config_index), "INT_DOTS": int_dots} | {
            k: v for k, v in config.items() if k.startswith("BLOCK")}
    else:
        signature = {"x_ptr": act, "w_ptr": "*u8", "bias_ptr": act, "y_ptr": act if kernel_name == "qmm" else "*fp32",
                     "tables_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "row_bytes": "i32"}
        constexprs = common | {"HAS_BIAS": True, "DOT_DTYPE": tl_dtype}
        if kernel_name == "qmm":
            kernel = qmatmul.qmm_kernel
            signature["stride_ym"] = "i32"
            bn, bm, bk, group, num_warps, num_stages = gemm_configs(dtype, layout, cc)[config_index]
            constexprs |= dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, GROUP_N=group)
        else:
            kernel = qmatmul.qmv_kernel
            config = split_k_config(fmt, layout, dtype, cc)
            num_warps, num_stages = config["num_warps"], config["num_stages"]
            half = uses_half_x(fmt, layout, dtype)
            prepared = prepares_split_k_x(fmt, layout, dtype)
            signature = {"x_ptr": "*fp16" if half and prepared else act,
                         "x_shifts_ptr": "*i32" if half and prepared else "*fp32",
                         "x_sums_ptr": "*bf16" if prepared and fmt == "Q2_K" else "*fp32"} | {
                name: kind for name, kind in signature.items() if name != "x_ptr"}
            signature["k_per_split"] = "i32"
            constexprs |= {"EVEN": bool(config_index), "FORM": split_k_form(cc),
                           "HALF_WEIGHTS": uses_half_weights(fmt, layout, dtype), "X_SHIFTS": half and prepared,
                           "INT_TILES": uses_int_tiles(fmt, layout, dtype),
                           "LEVEL_TILES": uses_level_tiles(fmt, layout, dtype)} | {
                k: v for k, v in config.items() if k.startswith("BLOCK")}
            if half:
                constexprs["DOT_DTYPE"] = tl.float16
    for name in constexprs:
        signature[name] = "constexpr"
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **options))


def compile_one(job) -> dict:
    kernel_name, fmt, dtype, config_index, cc, layout = job
    row = dict(kernel=kernel_name, format=fmt, dtype=dtype, config=config_index, cc=cc, layout=layout)
    try:
        compiled = compile_kernel(*job, divisible_by_16=POINTER_ARGUMENTS[kernel_name])
        regs, spills = _ptxas_stats(compiled.asm["ptx"], cc)
    except Exception as e:  # reported per job: one broken config must not hide the others
        return row | dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    return row | dict(shared=compiled.metadata.shared, registers=regs, spills=spills, error=None)


def problems(row: dict) -> list[str]:
    if row["error"]:
        return [row["error"]]
    found = []
    if row["spills"]:
        found.append(f"{row['spills']} bytes of register spills")
    if row["shared"] > SHARED_LIMIT[row["cc"]]:
        found.append(f"shared memory {row['shared']} > {SHARED_LIMIT[row['cc']]}")
    return found


def _compiler_process():
    # The kernels must be real JIT functions here: under TRITON_INTERPRET=1 (the test suite's CPU setting) they are
    # decorated as interpreted ones, which cannot be compiled. Workers are spawned, so they import them afresh.
    os.environ.pop("TRITON_INTERPRET", None)


def run(job_list, workers: int) -> list[dict]:
    """Compile in fresh worker processes (see `_compiler_process`)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=_compiler_process) as pool:
        return list(pool.map(compile_one, job_list))


def parse_archs(text: str) -> tuple[int, ...]:
    """"sm_89,90" -> (89, 90): compute capabilities, with or without the sm_ prefix, each one SHARED_LIMIT knows."""
    archs = []
    for item in (a.strip() for a in text.split(",")):
        digits = item.lower().removeprefix("sm_")
        if not digits.isdigit() or int(digits) not in SHARED_LIMIT:
            raise argparse.ArgumentTypeError(f"unknown architecture {item!r}; known: "
                                             + ", ".join(f"sm_{cc}" for cc in SHARED_LIMIT))
        archs.append(int(digits))
    return tuple(archs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=parse_archs, default=tuple(SHARED_LIMIT),
                        help="comma-separated GPU architectures, sm_89 or 89 (default: "
                             + ",".join(f"sm_{cc}" for cc in SHARED_LIMIT) + ")")
    parser.add_argument("--formats", default=None, help="comma-separated (default: every kernel format)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="comma-separated weight layouts (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="compiling processes (default: the number of CPU cores, here %(default)s)")
    args = parser.parse_args(argv)
    archs = args.archs
    formats = args.formats.split(",") if args.formats else None
    layouts = tuple(args.layouts.split(","))
    if set(layouts) - set(LAYOUTS):
        parser.error(f"unknown layout in {args.layouts!r}; layouts: {', '.join(LAYOUTS)}")
    rows = run(list(jobs(archs, formats, layouts=layouts)), args.workers)
    print("| kernel | format | layout | dtype | config | sm | shared KB | registers | spills | problem |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    failed = 0
    for row in rows:
        issues = problems(row)
        failed += bool(issues)
        print(f"| {row['kernel']} | {row['format']} | {row['layout']} | {row['dtype']} | {row['config']} | {row['cc']} | "
              f"{row.get('shared', 0) / 1024:.0f} | {row.get('registers', '—')} | {row.get('spills', '—')} | "
              f"{'; '.join(issues)} |")
    print(f"\n{len(rows)} compilations, {failed} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
