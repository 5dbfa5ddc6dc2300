"""Static speed of the Triton kernels without a GPU: their SASS main loops, and a throughput model on five GPUs.

    python -m bench.sass [--archs sm_90] [--formats Q4_K,Q8_0] [--m 1,16,256,4608] [--workers N]

Each kernel launch `quant_linear` makes with bf16 activations (the GEMM for M > 16 in each tile its autotuner tries,
the split-K tensor-core GEMV for 1 < M <= 16 (for `kernels.triton.ops.HALF_WEIGHT_FORMATS` without its short pass
over the weight's row scales before the loop, and with bf16 x for those, `INT_TILE_FORMATS` and `LEVEL_TILE_FORMATS`
without `split_k_x_kernel`, which prepares x once and zeroes y, in place of the launch that zeroes y), the FMA GEMV
for M = 1 (on integer dot products for
`kernels.triton.ops.INT_DOT_FORMATS`, without the launch that rounds x to 16 bits first; NF4 the split-K there too,
`kernels.triton.ops.SPLIT_K_AT_M_1`), the dequantize kernel of "dequantize + matmul")
is compiled for the architecture as Triton's JIT
specialises it for Flux's shapes (every pointer and every size that is a multiple of 16 marked so: K, N, strides,
`row_bytes` where the format's row length is), with Triton's bundled ptxas, and disassembled with its cuobjdump.
The main loop is the backward branch's body holding the most tensor-core instructions (the dequantize kernel has no
loop: its whole body, one tile per program). Per weight element decoded in one iteration: SASS instructions x
threads per program / (BLOCK_N x BLOCK_K), by class. A bf16 kernel of the GEMM's structure (same tiles, the weight
tile loaded as bf16; the first GEMM tile of sm_80-89) is compiled the same way as the baseline.

Throughput model (written down in GPUS and PIPE_LANES): a launch takes the longest of
- issue: scheduler clocks per element x elements decoded (N x K per M tile of the GEMM, once for the GEMV and the
  dequantize kernel) / (SMs x 4 warp schedulers x 32 lanes x clock). A scheduler issues one warp instruction a
  clock, but its integer and logic pipe (`alu`: LOP3, SHF, PRMT, IADD3...) has 16 lanes, so it takes one such
  instruction every other clock; so does IMAD's (`fmaheavy`); the float32 pipes take one a clock on sm_86-90 (fmaheavy
  and fmalite), one every other clock on sm_80; conversions (`xu`) one every 8. The loop's clocks are the most any
  of those (or issue itself) needs (`scheduler_clocks`), a lower bound: shared-memory and load/store throughput,
  latencies and dual-issue limits are not modelled;
- tensor cores: 2 x M (padded to the tile; the bf16 baseline pads small M to 16 only, as an autotuned matmul's
  small-M tiles do) x N x K / dense bf16 rate with fp32 accumulation;
- memory: weight bytes (read once: L2 holds a weight tile for the M tiles that share it), activations and result /
  DRAM bandwidth.
The bf16 matmul baseline is the bf16 kernel through the same model; "dequantize + matmul" is the dequantize kernel
followed by that bf16 kernel. Estimates, not measurements: a GPU run overrules them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
import multiprocessing

import triton
import triton.language as tl

from bench.compile_check import POINTER_ARGUMENTS, _compiler_process, _ptxas_stats, compile_kernel, parse_archs
from bench.kernels import SHAPES

# name -> (compute capability, SMs, boost clock GHz, dense bf16 TFLOP/s with fp32 accumulation, DRAM TB/s)
GPUS = {
    "H100 SXM": (90, 132, 1.83, 989.0, 3.35),
    "A100 SXM 80GB": (80, 108, 1.41, 312.0, 2.04),
    "RTX 4090": (89, 128, 2.52, 165.2, 1.01),  # GeForce: fp32 accumulation at half the fp16-accumulate rate
    "RTX 3090": (86, 82, 1.70, 71.0, 0.936),
    "RTX 4060 Ti": (89, 34, 2.54, 44.0, 0.288),
    "H200 SXM": (90, 132, 1.83, 989.0, 4.8),  # the H100's die and clocks, HBM3e
}
# how torch.cuda.get_device_name names each GPU of GPUS (`gpu_of_device`)
DEVICE_NAMES = {"H100 SXM": "H100", "A100 SXM 80GB": "A100", "RTX 4090": "RTX 4090", "RTX 3090": "RTX 3090",
                "RTX 4060 Ti": "RTX 4060 Ti", "H200 SXM": "H200"}
FUSED_KERNEL = {"gemv": "gemv", "split-k": "qmv", "gemm": "qmm"}  # kernels.triton.ops.fused_kernel -> row kernel
LANES_PER_CLOCK = 4 * 32  # 4 warp schedulers per SM, one warp instruction each per clock
M_VALUES = (1, 16, 256, 4608)
FLUX_K, FLUX_N = SHAPES["proj"]  # specialisation and the per-launch estimates use this shape

CLASSES = {  # opcode (before the first '.') -> class
    "global load": ("LDG", "LDGSTS", "LDGDEPBAR"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "tensor": ("HMMA", "HGMMA", "IMMA", "WGMMA"),
    "convert": ("I2F", "F2F", "F2I", "I2FP", "F2FP", "I2I", "FRND"),
    "float": ("FADD", "FMUL", "FFMA", "FMNMX", "HADD2", "HMUL2", "HFMA2", "FSEL", "FSETP", "MUFU", "FCHK"),
    "int": ("IADD3", "IMAD", "LOP3", "SHF", "SHL", "SHR", "ISETP", "IABS", "LEA", "PRMT", "SEL", "IMNMX", "VIADD",
            "SGXT", "BMSK", "POPC", "FLO", "IADD", "VIMNMX", "BREV", "LOP"),
}
CLASS_OF = {opcode: name for name, opcodes in CLASSES.items() for opcode in opcodes}
# Execution pipes of an SM sub-partition (Nsight Compute's names) and the opcodes dispatched to each: `alu` runs
# integer, logic and data-movement instructions but IMAD (and the fast float -> 16-bit packing, F2FP); `fmaheavy`
# IMAD and the integer dot products; `fp32` float32 and packed 16-bit arithmetic, on fmaheavy and fmalite together
# from sm_86 on; `xu` conversions and special functions. NVIDIA's throughput table (CUDA C++ Programming Guide,
# arithmetic instructions) gives 64 results a clock per SM for 32-bit integer, logic and shift instructions on
# sm_80-90, 128 for float32 from sm_86 on (64 on sm_80), 16 for conversions.
PIPES = {
    "alu": ("IADD3", "LOP3", "SHF", "SHL", "SHR", "ISETP", "IABS", "LEA", "PRMT", "SEL", "IMNMX", "SGXT", "BMSK",
            "POPC", "FLO", "IADD", "VIMNMX", "BREV", "LOP", "MOV", "FSEL", "FSETP", "FMNMX", "F2FP", "I2FP",
            "PLOP3", "P2R", "R2P"),
    "fmaheavy": ("IMAD", "IMUL", "IDP"),
    "fp32": ("FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2"),
    "xu": ("I2F", "F2F", "F2I", "I2I", "FRND", "MUFU"),
}
PIPE_OF = {opcode: name for name, opcodes in PIPES.items() for opcode in opcodes}
# warp instructions a pipe takes per scheduler clock, per compute capability (fmaheavy's IMAD also occupies one of
# the float32 pipes' slots: `scheduler_clocks`)
PIPE_RATES = {80: {"alu": 0.5, "fmaheavy": 0.5, "fp32": 0.5, "xu": 0.125},
              86: {"alu": 0.5, "fmaheavy": 0.5, "fp32": 1.0, "xu": 0.125},
              89: {"alu": 0.5, "fmaheavy": 0.5, "fp32": 1.0, "xu": 0.125},
              90: {"alu": 0.5, "fmaheavy": 0.5, "fp32": 1.0, "xu": 0.125}}


def scheduler_clocks(opcodes: list[str], cc: int) -> tuple[float, str]:
    """The clocks one warp scheduler needs for `opcodes` (one warp's), and what bounds them: issue (one
    instruction a clock) or the busiest pipe (`PIPE_RATES`). IMAD counts in both fmaheavy and the float32 pipes,
    which share fmaheavy. Architectures without rates written down take issue alone."""
    rates = PIPE_RATES.get(cc)
    counts = Counter(PIPE_OF.get(op.split(".")[0]) for op in opcodes)
    clocks = {"issue": float(len(opcodes))}
    if rates:
        clocks |= {"alu": counts["alu"] / rates["alu"], "fmaheavy": counts["fmaheavy"] / rates["fmaheavy"],
                   "fp32": (counts["fp32"] + counts["fmaheavy"]) / rates["fp32"], "xu": counts["xu"] / rates["xu"]}
    bound = max(clocks, key=clocks.get)
    return clocks[bound], bound
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH_TARGET = re.compile(r"(\.L_x_\d+)|\b0x([0-9a-f]+)\b")


def bf16_mm_kernel_source():
    """The baseline: qmm_kernel's structure with a bf16 weight (N, K) instead of a decoded one."""

    @triton.jit
    def bf16_mm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_n, pid_m = pid // num_m, pid % num_m
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                        other=0.0)
            x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                        mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        y = y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :]
        tl.store(y, acc.to(tl.bfloat16), mask=(m[:, None] < M) & (n[None, :] < N))

    return bf16_mm_kernel


def divisible_arguments(kernel_name: str, fmt: str, layout: str) -> tuple[str, ...]:
    """The arguments Triton's JIT marks as multiples of 16 on Flux's layers (K, N multiples of 256; bf16 rows)."""
    from kernels.formats import get_format
    from kernels.repack import planes_row_bytes

    pointers = POINTER_ARGUMENTS[kernel_name]
    sizes = {"qmm": ("N", "K", "stride_ym"), "qmv": ("N", "K", "k_per_split"),
             "gemv": ("N", "K", "k_per_split"), "dequant": ("N", "K")}[kernel_name]
    fmt_row_bytes = planes_row_bytes(get_format(fmt), FLUX_K) if layout == "planes" else get_format(fmt).row_bytes(FLUX_K)
    row_bytes = ("row_bytes",) if fmt_row_bytes % 16 == 0 else ()
    return pointers + sizes + row_bytes


def disassemble(cubin: bytes) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([cuobjdump, "-sass", handle.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """The opcodes (with modifiers) of the main loop: the body of the backward branch with the most tensor-core
    instructions (ties: the longest); the whole kernel where there is no loop. Branch targets are addresses
    (`BRA 0x21b0`, as Triton's bundled cuobjdump prints them) or labels (`BRA `(.L_x_1)`, as nvdisasm does)."""
    instructions, index_of = [], {}
    for line in sass.splitlines():
        if label := LABEL.match(line):
            index_of[label[1]] = len(instructions)
        elif match := INSTRUCTION.search(line):
            index_of[int(match[1], 16)] = len(instructions)
            instructions.append((match[2], match[3]))
    loops = []
    for end, (opcode, operands) in enumerate(instructions):
        target = BRANCH_TARGET.search(operands) if opcode.startswith("BRA") else None
        if target is None:
            continue
        start = index_of.get(target[1] or int(target[2], 16), end)
        if start < end:  # not the `BRA` to itself that ends every kernel
            body = [op for op, _ in instructions[start:end + 1]]
            loops.append((sum(CLASS_OF.get(op.split(".")[0]) == "tensor" for op in body), len(body), body))
    return max(loops)[2] if loops else [op for op, _ in instructions if op not in ("NOP", "EXIT", "BRA")]


def load_width(opcode: str) -> int:
    """Bits per lane of a global load: .U8/.S8 8, .U16/.S16 16, .64 64, .128 128, otherwise 32."""
    parts = set(opcode.split(".")[1:])
    return 8 if parts & {"U8", "S8"} else 16 if parts & {"U16", "S16"} else 64 if "64" in parts else \
        128 if "128" in parts else 32


def analyse(job) -> dict:
    """Compile one (kernel, format, cc, layout[, GEMM config index]) and count its main loop."""
    kernel_name, fmt, cc, layout = job[:4]
    config_index = job[4] if len(job) > 4 else 0
    from kernels.triton.ops import DEQUANT_CONFIG, GEMV_CONFIGS, HALF_CONFIGS, gemm_configs, split_k_config

    if kernel_name == "bf16":
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = bf16_mm_kernel_source()
        bn, bm, bk, _, warps, stages = HALF_CONFIGS[0]
        signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                     "stride_xm": "i32", "stride_ym": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                     "BLOCK_K": "constexpr"}
        divisible = ("x_ptr", "w_ptr", "y_ptr", "N", "K", "stride_xm", "stride_ym")
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=dict(
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), attrs=attrs), target=GPUTarget("cuda", cc, 32),
            options=dict(num_warps=warps, num_stages=stages))
    else:
        compiled = compile_kernel(kernel_name, fmt, "bf16", config_index, cc, layout,
                                  divisible_arguments(kernel_name, fmt, layout))
        if kernel_name == "qmm":
            bn, bm, bk, _, warps, _ = gemm_configs("bf16", layout, cc)[config_index]
        else:
            config = {"qmv": split_k_config(fmt, layout, "bf16", cc), "gemv": GEMV_CONFIGS[layout],
                      "dequant": DEQUANT_CONFIG}[kernel_name]
            bn, bk, warps, bm = config["BLOCK_N"], config["BLOCK_K"], config["num_warps"], config.get("BLOCK_M", 0)
    loop = main_loop(disassemble(compiled.asm["cubin"]))
    registers, spills = _ptxas_stats(compiled.asm["ptx"], cc)
    per_element = 32 * warps / (bn * bk)
    classes = Counter(CLASS_OF.get(op.split(".")[0], "other") for op in loop)
    widths = Counter(load_width(op) for op in loop if op.startswith("LDG"))
    clocks, bound = scheduler_clocks(loop, cc)
    return dict(kernel=kernel_name, format=fmt, cc=cc, layout=layout, block_m=bm, block_n=bn, block_k=bk, warps=warps,
                loop=len(loop), per_element=len(loop) * per_element, clocks_per_element=clocks * per_element,
                bound_by=bound,
                by_class={name: count * per_element for name, count in classes.items()},
                load_widths=dict(sorted(widths.items())), registers=registers, spills=spills,
                shared=compiled.metadata.shared)


def launch_terms(row: dict, gpu: tuple, M: int, weight_bytes: float, K: int = FLUX_K,
                 N: int = FLUX_N) -> tuple[float, float, float]:
    """The model's issue, tensor-core and memory times (s) of one launch of `row`'s kernel for (M, K) x (K, N)."""
    _, sms, ghz, tflops, tbs = gpu
    if row["kernel"] == "dequant":
        decoded, flops, moved = N * K, 0, weight_bytes + 2 * N * K
    else:
        m_tiles = math.ceil(M / row["block_m"]) if row["kernel"] in ("qmm", "bf16") else 1
        # the bf16 baseline stands for an autotuned matmul: below its tile's M it pads M to 16, not to the tile
        padded = min(row["block_m"], 16 * math.ceil(M / 16)) if row["kernel"] == "bf16" else row["block_m"]
        decoded, flops = N * K * m_tiles, 2 * m_tiles * padded * N * K
        moved = weight_bytes + 2 * M * K + 2 * M * N
    issue = row["clocks_per_element"] * decoded / (sms * LANES_PER_CLOCK * ghz * 1e9)
    return issue, flops / (tflops * 1e12), moved / (tbs * 1e12)


def launch_ms(row: dict, gpu: tuple, M: int, weight_bytes: float, K: int = FLUX_K, N: int = FLUX_N) -> float:
    """The model's time of one launch: the longest of its issue, tensor-core and memory times."""
    return 1e3 * max(launch_terms(row, gpu, M, weight_bytes, K, N))


class LaunchModel:
    """The model's launches on one GPU from `analyse` rows: per format the fused kernel `quant_linear_triton` runs
    for M (the GEMM in the fastest of its tiles, as its autotuner picks), dequantize + the bf16 kernel, and the bf16
    kernel alone, on a (K, N) weight."""

    def __init__(self, rows: list[dict], gpu: tuple):
        self.gpu = gpu
        cc = gpu[0]
        run = [r for r in rows if r["cc"] == cc and r["layout"] == kernel_layout(r["format"])]
        self.rows = {(r["kernel"], r["format"]): r for r in run if r["kernel"] != "qmm"}
        self.gemm_tiles = {}
        for r in run:
            if r["kernel"] == "qmm":
                self.gemm_tiles.setdefault(r["format"], []).append(r)
        self.formats = sorted({r["format"] for r in run if r["kernel"] != "bf16"})

    def has_baseline(self) -> bool:
        return ("bf16", "BF16") in self.rows

    def bf16_ms(self, M: int, K: int = FLUX_K, N: int = FLUX_N) -> float:
        return launch_ms(self.rows[("bf16", "BF16")], self.gpu, M, 2 * N * K, K, N)

    def fused(self, fmt: str, M: int, K: int = FLUX_K, N: int = FLUX_N) -> tuple[dict, float]:
        """The fused kernel's row and its time (ms)."""
        from kernels.triton.ops import fused_kernel

        weight_bytes = get_format_bytes(fmt, K, N)
        kind = fused_kernel(M, fmt, "bf16")
        if kind == "gemm":
            row = min(self.gemm_tiles[fmt], key=lambda r: launch_ms(r, self.gpu, M, weight_bytes, K, N))
        else:
            row = self.rows[(FUSED_KERNEL[kind], fmt)]
        return row, launch_ms(row, self.gpu, M, weight_bytes, K, N)

    def dequant_matmul_ms(self, fmt: str, M: int, K: int = FLUX_K, N: int = FLUX_N) -> float:
        return launch_ms(self.rows[("dequant", fmt)], self.gpu, M, get_format_bytes(fmt, K, N), K, N) + \
            self.bf16_ms(M, K, N)


def get_format_bytes(fmt: str, K: int, N: int) -> int:
    """Bytes of a (N, K) weight of `fmt` as stored."""
    from kernels.formats import get_format

    return get_format(fmt).row_bytes(K) * N


def gpu_of_device(device_name: str) -> str:
    """The GPUS entry for torch's name of a GPU ("NVIDIA H200" -> "H200 SXM"); the longest name that matches."""
    matches = [gpu for gpu, name in DEVICE_NAMES.items() if name in device_name]
    if not matches:
        raise ValueError(f"no model of {device_name!r} in bench.sass.GPUS ({', '.join(GPUS)})")
    return max(matches, key=lambda gpu: len(DEVICE_NAMES[gpu]))


def estimate_rows(rows: list[dict], ms: list[int]):
    """Per (GPU, format, M): the fused kernel's, dequantize + bf16 matmul's and the best one's time over the bf16
    kernel's, and the fused kernel's issue time over its memory time (<= 0.8: memory-bound), on the `proj` shape (the
    matmul after the dequantize kernel is the bf16 kernel too, so that both sides of each ratio go through the same
    model)."""
    for gpu_name, gpu in GPUS.items():
        model = LaunchModel(rows, gpu)
        if not model.has_baseline():
            continue
        for fmt in model.formats:
            for M in ms:
                base = model.bf16_ms(M)
                fused_row, fused = model.fused(fmt, M)
                issue, _, memory = launch_terms(fused_row, gpu, M, get_format_bytes(fmt, FLUX_K, FLUX_N))
                scratch = model.dequant_matmul_ms(fmt, M)
                yield (gpu_name, fmt, M, base, fused / base, scratch / base, min(fused, scratch) / base,
                       issue / memory)


def static_methods(rows: list[dict]) -> dict[int, tuple[str, dict[str, str]]]:
    """Per architecture `rows` cover: the dispatch method the model prefers per (format, M bucket) on the first GPU of
    GPUS with that architecture, {cc: (GPU name, {"<format>@<bucket>": "fused" or "dequant_matmul"})}."""
    from kernels.dispatch import M_BUCKETS

    estimates = list(estimate_rows(rows, list(M_BUCKETS)))
    if not estimates:
        raise ValueError("no bf16 baseline compiled: cannot choose methods")
    chosen = {}
    for name, (cc, *_) in GPUS.items():
        if cc not in chosen and any(e[0] == name for e in estimates):
            chosen[cc] = (name, {f"{fmt}@{M}": "fused" if fused <= scratch else "dequant_matmul"
                                 for gpu, fmt, M, _, fused, scratch, *_ in estimates if gpu == name})
    return chosen


def dequantize_rows(rows: list[dict]):
    """Per (GPU, format): the dequantize kernel's estimated time on the `proj` weight against the time to read its
    quantized bytes and write them as bf16 at the GPU's bandwidth (memory speed is a ratio of 1)."""
    for gpu_name, gpu in GPUS.items():
        for r in rows:
            if r["kernel"] == "dequant" and r["cc"] == gpu[0] and r["layout"] == kernel_layout(r["format"]):
                weight_bytes = get_format_bytes(r["format"], FLUX_K, FLUX_N)
                memory = 1e3 * (weight_bytes + 2 * FLUX_N * FLUX_K) / (gpu[4] * 1e12)
                estimate = launch_ms(r, gpu, 0, weight_bytes)
                yield gpu_name, r["format"], estimate, memory, estimate / memory


def kernel_layout(fmt: str) -> str:
    """The layout quant_linear's weights have on a GPU (`kernels.repack`): planes where the format has them."""
    from kernels.repack import has_planes

    return "planes" if fmt != "BF16" and has_planes(fmt) else "blocks"


def jobs(archs, formats):
    """Each kernel in the layout it runs on (planes formats in both, to compare); the GEMM in each of its tiles in
    the layout it runs on."""
    from kernels.triton.ops import GEMV_CONFIGS, even_tiles, gemm_configs, split_k_config

    for cc in archs:
        yield ("bf16", "BF16", cc, "blocks")
        for fmt in formats:
            for layout in dict.fromkeys(("blocks", kernel_layout(fmt))):
                tiles = len(gemm_configs("bf16", layout, cc)) if layout == kernel_layout(fmt) else 1
                yield from (("qmm", fmt, cc, layout, i) for i in range(tiles))
                # Flux's shapes fill the split-K kernels' tiles: their launches without masked weight loads
                # (compile_check's index 1)
                split_k = split_k_config(fmt, layout, "bf16", cc)
                for kernel, config in (("qmv", split_k), ("gemv", GEMV_CONFIGS[layout])):
                    yield (kernel, fmt, cc, layout, int(even_tiles(layout, FLUX_N, FLUX_K, config)))
                yield ("dequant", fmt, cc, layout)


def main(argv: list[str] | None = None) -> None:
    from kernels.triton.decode import KERNEL_FORMATS

    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=parse_archs, default=(90,),
                        help="comma-separated GPU architectures, sm_89 or 89 (default: sm_90)")
    parser.add_argument("--formats", help="comma-separated kernel formats (default: all)")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)),
                        help="token counts M for the estimates (default: %(default)s)")
    parser.add_argument("--write-static-dispatch", action="store_true",
                        help="store the model's preferred method per (format, M bucket) as quant_linear's default "
                             "on each architecture compiled for, where no GPU has measured a table "
                             "(kernels/dispatch_tables/static-model-sm<cc>.json)")
    parser.add_argument("--json", type=Path,
                        help="also write the analysed rows as JSON (what `python -m bench.model_error` reads)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="compiling processes (default: the number of CPU cores, here %(default)s)")
    args = parser.parse_args(argv)
    formats = args.formats.split(",") if args.formats else list(KERNEL_FORMATS)
    unknown = set(formats) - set(KERNEL_FORMATS)
    if unknown:
        parser.error(f"no Triton kernel for {', '.join(sorted(unknown))}; kernel formats: {', '.join(KERNEL_FORMATS)}")
    ms = [int(m) for m in args.m.split(",")]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, args.workers), mp_context=context, initializer=_compiler_process) as pool:
        rows = list(pool.map(analyse, list(jobs(args.archs, formats))))

    classes = list(CLASSES) + ["other"]
    print(f"SASS main loops, bf16 activations, specialised for Flux's {FLUX_K}->{FLUX_N} layer; instructions per "
          f"weight element = loop instructions x threads / (BLOCK_N x BLOCK_K); clocks per element: the scheduler "
          f"clocks the busiest pipe (or issue) needs for them, in those units\n")
    print("| sm | kernel | format | layout | tile N×K (M) | warps | loop instr | per element | clocks per element "
          "(bound by) | " + " | ".join(classes) + " | global load widths (bits: count) | registers | spills | "
          "shared KB |")
    print("|---:|---|---|---|---|---:|---:|---:|---:|" + "---:|" * len(classes) + "---|---:|---:|---:|")
    for r in rows:
        cells = [f"{r['by_class'].get(name, 0):.2f}" for name in classes]
        widths = ", ".join(f"{bits}: {count}" for bits, count in r["load_widths"].items())
        print(f"| {r['cc']} | {r['kernel']} | {r['format']} | {r['layout']} | {r['block_n']}×{r['block_k']} ({r['block_m']}) | "
              f"{r['warps']} | {r['loop']} | {r['per_element']:.2f} | {r['clocks_per_element']:.2f} ({r['bound_by']}) | "
              + " | ".join(cells)
              + f" | {widths} | {r['registers']} | {r['spills']} | {r['shared'] / 1024:.0f} |")

    print(f"\nEstimated time over the bf16 kernel's ({FLUX_K}->{FLUX_N}; fused: the FMA GEMV at M = 1 (on integer "
          f"dot products for `ops.INT_DOT_FORMATS`, without the launch rounding x; NF4: the split-K, "
          f"`ops.SPLIT_K_AT_M_1`), the split-K tensor-core GEMV for M <= 16, the GEMM above in its fastest tile; "
          f"fused issue / memory <= 0.8 is memory-bound)\n")
    print("| GPU | format | M | bf16 kernel (ms) | fused / bf16 | dequantize + matmul / bf16 | best / bf16 | "
          "fused issue / memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for gpu, fmt, M, base, fused, scratch, best, bound in estimate_rows(rows, ms):
        print(f"| {gpu} | {fmt} | {M} | {base:.4f} | {fused:.2f} | {scratch:.2f} | {best:.2f} | {bound:.2f} |")

    print(f"\nThe dequantize kernel against memory speed ({FLUX_K}->{FLUX_N} weight: read the quantized bytes, write "
          f"bf16; target <= 1.2)\n")
    print("| GPU | format | dequantize (ms) | memory time (ms) | ratio |")
    print("|---|---|---:|---:|---:|")
    for gpu, fmt, estimate, memory, ratio in dequantize_rows(rows):
        print(f"| {gpu} | {fmt} | {estimate:.4f} | {memory:.4f} | {ratio:.2f} |")
    if args.json:
        args.json.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")  # a row a line
        print(f"\nwrote {args.json}")
    if args.write_static_dispatch:
        from kernels.dispatch import write_static_table

        for cc, (gpu, methods) in static_methods(rows).items():
            path = write_static_table(methods, f"python -m bench.sass --write-static-dispatch: {gpu} throughput model",
                                      cc)
            print(f"\nwrote kernels/dispatch_tables/{path.name} ({gpu} model): "
                  + ", ".join(f"{k} {v}" for k, v in sorted(methods.items())))


if __name__ == "__main__":
    main()
