"""`quant_linear` against a dense bf16 matmul and against dequantize-then-matmul, on Flux's real layer shapes.

    python -m bench.kernels [--formats Q4_K,Q8_0] [--shapes proj,mlp_in] [--m 1,16,512] [--device cpu|cuda]
                            [--repeats N] [--csv PATH] [--write-dispatch]

For every (shape, M, format): `quant_linear(x, W)` (on CUDA the fused Triton kernels, on the CPU the torch
dequantize + F.linear path), `torch.matmul(x, W_bf16.T)` with a dense bf16 weight of the same shape, and what today's
tools do, `F.linear(x, W.dequantize(bf16))` on every call; x is bf16 `(M, K)`. All three are measured in the same run;
the table gives quant_linear's time, TFLOP/s (2·M·N·K / time), GB/s of weight bytes read (QTensor.nbytes / time), and
its speedup over each of the other two (reference time / quant_linear time: above 1× quant_linear is faster), and
a `QuantLinear` compiled with `torch.compile(fullgraph=True)` against the same call eager (quant_linear is a custom
operator, so the compiled graph calls the same kernels: the difference is Python and dispatch overhead).
It prints a markdown table and writes the same rows as CSV (default `bench/results/kernels-<GPU name>.csv` or
`kernels-cpu-<N>core.csv`; an existing file there is replaced only when `--csv` names it). On CUDA it
also times the other Triton method, dequantize into a scratch buffer + torch matmul; `--write-dispatch` stores the
faster of the two per (format, M bucket) as the GPU's dispatch table (`kernels.dispatch`), which quant_linear follows.

Timing: on CUDA the median of `--repeats` calls timed with CUDA events, each after an L2 flush, and after warm-up calls
(the first of which compiles the Triton kernel and runs the autotuner's tuning for that shape, outside the timings);
on the CPU the best of `--repeats` `time.perf_counter` calls after one warm-up call. Defaults: on CUDA the full sweep
(every kernel format, every shape, M in 1, 16, 512, 4096, 4608); on the CPU a couple of formats, shapes and M that
finish in about a minute on 2 cores.

Triton's interpreter (TRITON_INTERPRET=1) is refused: its timings say nothing about the kernels.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.formats import get_format
from kernels.qtensor import QTensor
from kernels import dispatch
from kernels.quant_linear import QuantLinear, quant_linear, quant_linear_method

# Flux.1's Linear layers, name -> (K in, N out)
SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (3072, 9216),         # double blocks: img/txt attn.qkv
    "proj": (3072, 3072),        # double blocks: attn.proj
    "mlp_in": (3072, 12288),     # double blocks: mlp.0
    "mlp_out": (12288, 3072),    # double blocks: mlp.2
    "linear1": (3072, 21504),    # single blocks: linear1 (qkv + mlp in)
    "linear2": (15360, 3072),    # single blocks: linear2 (attn out + mlp out)
    "modulation": (3072, 18432), # double blocks: img/txt_mod.lin
}
M_VALUES = (1, 16, 512, 4096, 4608)  # one token row (modulation), a small batch, and the 4096 image + 512 text tokens
CPU_DEFAULTS = dict(formats=("Q4_K", "Q8_0"), shapes=("proj", "mlp_in"), m=(1, 16, 512), repeats=3)
CUDA_REPEATS = 25
CUDA_WARMUP_CALLS = 3  # after the first (compiling, autotuning) call
L2_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2, so every timed call reads its weight from memory
TILE_ROWS = 256  # rows actually quantized; the weight repeats them (speed does not depend on the values)
DTYPE = torch.bfloat16
CPU_NOTE = "Triton numbers need a GPU; on CPU quant_linear is the torch dequantize+matmul path"
MISSING = "—"

COLUMNS = (  # (table header, CSV / row key)
    ("format", "format"),
    ("shape", "shape"),
    ("M", "M"),
    ("path", "path"),
    ("time (ms)", "ms"),
    ("TFLOP/s", "tflops"),
    ("GB/s (weight)", "weight_gbps"),
    ("bf16 matmul (ms)", "bf16_ms"),
    ("dequant+matmul (ms)", "dequant_ms"),
    ("triton dequant+matmul (ms)", "scratch_ms"),
    ("compiled (ms)", "compiled_ms"),
    ("vs bf16 matmul", "speedup_vs_bf16"),
    ("vs dequant+matmul", "speedup_vs_dequant"),
    ("compiled vs eager", "speedup_compiled"),
)


def interpreter_requested() -> bool:
    """Whether Triton's interpreter is on: TRITON_INTERPRET set to a true value, or the kernels already built for it."""
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("", "0", "false", "off", "no"):
        return True
    if "kernels.triton.ops" in sys.modules:
        return sys.modules["kernels.triton.ops"].interpreting()
    return False


def parse_shape(spec: str) -> tuple[str, int, int]:
    """A Flux layer name (`qkv`, `proj`, ...) or `KxN` -> (label, K, N)."""
    spec = spec.strip()
    if spec in SHAPES:
        K, N = SHAPES[spec]
        return spec, K, N
    match = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not match:
        raise ValueError(f"unknown shape {spec!r}: use one of {', '.join(SHAPES)} or KxN (K in, N out)")
    K, N = int(match[1]), int(match[2])
    if min(K, N) < 1:
        raise ValueError(f"shape {spec!r}: K and N must be positive")
    return spec, K, N


def kernel_path(x: torch.Tensor, weight: QTensor) -> str:
    """Which implementation quant_linear runs for these arguments, as the table labels it."""
    method = quant_linear_method(x, weight)
    if method == "torch":
        return "torch"
    from kernels.triton.ops import DTYPES, fused_kernel, interpreting

    if interpreting():
        return "triton interpreter"
    if method == "fused":
        return f"triton {fused_kernel(x.numel() // x.shape[-1], weight.format, DTYPES[x.dtype][0])}"
    return f"triton {method}"


def make_weight(fmt: str, K: int, N: int, device: torch.device, seed: int = 0) -> QTensor:
    """A quantized (N, K) weight: TILE_ROWS rows of normal × 0.02 quantized with the torch codecs on `device`, repeated
    to N rows (quantizing whole K-quant matrices on a CPU takes tens of seconds; the kernels' speed does not depend on
    the values, only on there being no inf/NaN). On CUDA in the planes layout where the format has one, as the
    pipeline places it (`engine.streaming`)."""
    generator = torch.Generator().manual_seed(seed)
    tile = torch.randn((min(N, TILE_ROWS), K), generator=generator) * 0.02
    raw = QTensor.quantize(tile.to(device), fmt).raw
    raw = raw.repeat(math.ceil(N / raw.shape[0]), 1)[:N].contiguous()
    weight = QTensor(raw, fmt, (N, K))
    return weight.planes() if torch.device(device).type == "cuda" else weight


def time_cpu(fn, repeats: int) -> float:
    """Best of `repeats` calls in ms, after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def time_cuda(fn, repeats: int, device: torch.device) -> float:
    """Median of `repeats` calls in ms, CUDA events around each call, the L2 cache flushed before each. The first call
    (Triton compilation, the autotuner's benchmarking of its configs for this key) and a few more run untimed."""
    fn()
    torch.cuda.synchronize(device)
    for _ in range(CUDA_WARMUP_CALLS):
        fn()
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    flush = _L2_FLUSH[device]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def measure(fn, device: torch.device, repeats: int) -> float:
    return time_cuda(fn, repeats, device) if device.type == "cuda" else time_cpu(fn, repeats)


def bench_rows(formats: list[str], shapes: list[tuple[str, int, int]], ms: list[int], device: torch.device,
               repeats: int):
    """Yield one dict (keys: COLUMNS' second items, plus K and N) per (shape, M, format), in that loop order; the dense
    bf16 matmul is measured once per (shape, M) and shared by the formats."""
    generator = torch.Generator().manual_seed(1)
    for label, K, N in shapes:
        weights = {fmt: make_weight(fmt, K, N, device) for fmt in formats}
        # one compiled module per weight; dynamo makes M dynamic after the first new M
        compiled = {fmt: torch.compile(QuantLinear(weight), fullgraph=True) for fmt, weight in weights.items()}
        dense = weights[formats[0]].dequantize(DTYPE)  # realistic values, dense bf16, same shape
        for M in ms:
            x = (torch.randn((M, K), generator=generator)).to(device=device, dtype=DTYPE)
            bf16_ms = measure(lambda: torch.matmul(x, dense.T), device, repeats)
            for fmt in formats:
                weight = weights[fmt]
                path = kernel_path(x, weight)
                if device.type == "cuda" and path == "torch":
                    raise RuntimeError(f"{fmt} {label} M={M}: quant_linear takes the {path} path on CUDA, not Triton")
                dequant_ms = measure(lambda: F.linear(x, weight.dequantize(DTYPE)), device, repeats)
                scratch_ms = None
                if path.startswith("triton"):  # both Triton methods, whatever a dispatch table says
                    from kernels.triton.ops import dequant_matmul_triton, quant_linear_triton

                    fused_ms = measure(lambda: quant_linear_triton(x, weight, None), device, repeats)
                    scratch_ms = measure(lambda: dequant_matmul_triton(x, weight, None), device, repeats)
                    eager_ms = measure(lambda: quant_linear(x, weight), device, repeats)
                else:
                    fused_ms = eager_ms = measure(lambda: quant_linear(x, weight), device, repeats)
                compiled_ms = measure(lambda: compiled[fmt](x), device, repeats)
                yield dict(format=fmt, shape=label, K=K, N=N, M=M, path=path, ms=fused_ms,
                           tflops=2 * M * N * K / (fused_ms * 1e-3) / 1e12,
                           weight_gbps=weight.nbytes / (fused_ms * 1e-3) / 1e9,
                           bf16_ms=bf16_ms, dequant_ms=dequant_ms, scratch_ms=scratch_ms, compiled_ms=compiled_ms,
                           speedup_vs_bf16=bf16_ms / fused_ms, speedup_vs_dequant=dequant_ms / fused_ms,
                           speedup_compiled=eager_ms / compiled_ms)
        del weights, dense, compiled


def _number(value: float, digits: int = 3) -> str:
    """`digits` significant digits, thousands separated, no exponent."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def table_cells(row: dict) -> list[str]:
    """The markdown cells of one row (COLUMNS order)."""
    cells = []
    for _, key in COLUMNS:
        value = row.get(key)
        if value is None:
            cells.append(MISSING)
        elif key.startswith("speedup"):
            cells.append(f"{value:.2f}×")
        elif key == "shape":
            cells.append(f"{value} ({row['K']}→{row['N']})" if "K" in row else str(value))
        elif isinstance(value, float):
            cells.append(_number(value))
        else:
            cells.append(str(value))
    return cells


def table_header() -> list[str]:
    header = [name for name, _ in COLUMNS]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]


REPO = Path(__file__).resolve().parents[1]


def default_csv_path(device: torch.device) -> Path:
    """bench/results/kernels-<GPU name>.csv, or kernels-cpu-<N>core.csv with this process's N usable cores."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}core"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return REPO / "bench" / "results" / f"kernels-{slug}.csv"


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it: printed output gets committed, this machine's paths not."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows (also printed as a markdown table and written as CSV)."""
    from kernels.triton.decode import KERNEL_FORMATS

    default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", help=f"comma-separated kernel formats (default: CUDA all of "
                        f"{','.join(KERNEL_FORMATS)}; CPU {','.join(CPU_DEFAULTS['formats'])})")
    parser.add_argument("--shapes", help=f"comma-separated layer names ({','.join(SHAPES)}) or KxN "
                        f"(default: CUDA all; CPU {','.join(CPU_DEFAULTS['shapes'])})")
    parser.add_argument("--m", help=f"comma-separated token counts M (default: CUDA {','.join(map(str, M_VALUES))}; "
                        f"CPU {','.join(map(str, CPU_DEFAULTS['m']))})")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--repeats", type=int, help=f"timed calls per measurement (default: CUDA {CUDA_REPEATS}, "
                        f"median; CPU {CPU_DEFAULTS['repeats']}, best of)")
    parser.add_argument("--csv", type=Path,
                        help="CSV output (default: bench/results/kernels-<GPU name or cpu-<cores>core>.csv, here "
                             f"{shown(default_csv_path(default_device))}; an existing one is replaced only when "
                             "named here)")
    parser.add_argument("--write-dispatch", action="store_true",
                        help="CUDA: store the faster Triton method per (format, M bucket) as this GPU's dispatch table "
                             "(in the user cache directory, see kernels.dispatch), which quant_linear then follows")
    parser.add_argument("--allow-interpreter", action="store_true",
                        help="for the test suite only: run under TRITON_INTERPRET=1 (timings meaningless)")
    args = parser.parse_args(argv)

    if interpreter_requested() and not args.allow_interpreter:
        parser.error("TRITON_INTERPRET is set: quant_linear would run Triton's CPU interpreter, whose timings say "
                     "nothing about the kernels. Unset it (on the CPU the torch path is then benchmarked) or run on "
                     "a GPU.")
    device_name = args.device or default_device.type
    if device_name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    if args.write_dispatch and not on_cuda:
        parser.error("--write-dispatch measures the Triton methods: it needs --device cuda")
    try:
        formats = _list(args.formats) if args.formats else list(KERNEL_FORMATS if on_cuda else CPU_DEFAULTS["formats"])
        for fmt in formats:
            if fmt not in KERNEL_FORMATS:
                get_format(fmt)  # unknown names: the registry's message
                raise ValueError(f"{fmt} has no Triton kernel; kernel formats: {', '.join(KERNEL_FORMATS)}")
        shapes = [parse_shape(s) for s in (_list(args.shapes) if args.shapes
                                           else (SHAPES if on_cuda else CPU_DEFAULTS["shapes"]))]
        for fmt in formats:
            for _, K, _ in shapes:
                get_format(fmt).row_bytes(K)
        ms = [int(m) for m in _list(args.m)] if args.m else list(M_VALUES if on_cuda else CPU_DEFAULTS["m"])
        if not formats or not shapes or not ms or min(ms) < 1:
            raise ValueError("--formats, --shapes and --m need at least one entry each, M >= 1")
    except ValueError as error:
        parser.error(str(error))
    repeats = args.repeats or (CUDA_REPEATS if on_cuda else CPU_DEFAULTS["repeats"])
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    csv_path = args.csv or default_csv_path(device)
    if args.csv is None and csv_path.exists():  # committed results: replaced only when asked by name
        parser.error(f"{shown(csv_path)} exists; pass --csv {shown(csv_path)} to replace it or --csv PATH to write "
                     f"elsewhere")

    if on_cuda:
        import triton

        where = (f"{torch.cuda.get_device_name(device)}, triton {triton.__version__}; median of {repeats} calls "
                 f"(CUDA events, L2 flushed), after warm-up incl. autotuning")
    else:
        where = (f"CPU, {torch.get_num_threads()} thread(s); best of {repeats} calls (perf_counter) after one warm-up. "
                 f"{CPU_NOTE}")
    if interpreter_requested():
        where += ". TRITON INTERPRETER: timings are meaningless (test run)"
    print(f"quant_linear on bf16 x (M, K) @ W.T, torch {torch.__version__}, {where}. Speedup = reference time / "
          f"quant_linear time (>1× means quant_linear is faster); GB/s = quantized weight bytes / time.\n")
    for line in table_header():
        print(line)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["format", "shape", "K", "N", "M", "path", "ms", "tflops", "weight_gbps", "bf16_ms", "dequant_ms",
            "scratch_ms", "compiled_ms", "speedup_vs_bf16", "speedup_vs_dequant", "speedup_compiled", "device"]
    rows = []
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in bench_rows(formats, shapes, ms, device, repeats):
            rows.append(row)
            print("| " + " | ".join(table_cells(row)) + " |", flush=True)
            writer.writerow({**row, "device": torch.cuda.get_device_name(device) if on_cuda else "cpu"})
            handle.flush()
    print(f"\nCSV: {shown(csv_path)}")
    if args.write_dispatch:
        name = torch.cuda.get_device_name(device)
        path = dispatch.write_table(name, dispatch_methods(rows), "python -m bench.kernels " + " ".join(argv or []))
        print(f"dispatch table for {name}: {shown(path)}")
    return rows


def dispatch_methods(rows: list[dict]) -> dict[str, str]:
    """Per (format, M bucket), the Triton method with the smaller total time over the measured shapes."""
    totals: dict[str, tuple[float, float]] = {}
    for row in rows:
        if row["scratch_ms"] is not None:
            key = f"{row['format']}@{dispatch.m_bucket(row['M'])}"
            fused, scratch = totals.get(key, (0.0, 0.0))
            totals[key] = (fused + row["ms"], scratch + row["scratch_ms"])
    return {key: "fused" if fused <= scratch else "dequant_matmul" for key, (fused, scratch) in totals.items()}

if __name__ == "__main__":
    main()
