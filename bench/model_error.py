"""The static model's error against GPU timings: `bench.sass`'s estimate of every launch `bench.kernels` timed.

    python -m bench.model_error --csv bench/results/kernels-<GPU>.csv [--rows bench/results/sass-sm90.json]
                                [--gpu "H200 SXM"]

For each measured row (format, shape, M): the model's time (`bench.sass.LaunchModel`, on the row's K and N) of the
fused kernel `quant_linear_triton` runs, of dequantize + bf16 matmul, and of the bf16 matmul, each as measured over
modelled (above 1: the model was optimistic), then per kernel the median and range of those ratios ("gemv int":
the integer-dot GEMV, whose timings hold the launch rounding x that the model leaves out). The kernels'
counts come from the rows `python -m bench.sass --json` wrote (committed as bench/results/sass-sm*.json, so the GPU
machine compiles nothing); the GPU's constants from `bench.sass.GPUS`, named by --gpu or found from the CSV's device name.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from bench.sass import GPUS, LaunchModel, gpu_of_device
from kernels.triton.ops import fused_kernel, uses_int_dots

RESULTS = Path(__file__).resolve().parent / "results"


def measured_rows(csv_path: Path) -> list[dict]:
    """bench.kernels' CSV rows timed on a GPU (those of the CPU's torch path say nothing about the kernels)."""
    with open(csv_path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["path"].startswith("triton")]
    if not rows:
        raise ValueError(f"{csv_path}: no Triton timings (a CSV bench.kernels wrote on a GPU is needed)")
    return rows


def error_rows(measured: list[dict], model: LaunchModel):
    """Per measured row: (format, shape, M, fused kernel, then measured ms, modelled ms and their ratio for the fused
    kernel, dequantize + matmul and the bf16 matmul). Formats the model has no counts for are left out."""
    for row in measured:
        fmt, K, N, M = row["format"], int(row["K"]), int(row["N"]), int(row["M"])
        if fmt not in model.formats:
            continue
        _, fused = model.fused(fmt, M, K, N)
        pairs = [(float(row["ms"]), fused), (_number(row["scratch_ms"]), model.dequant_matmul_ms(fmt, M, K, N)),
                 (float(row["bf16_ms"]), model.bf16_ms(M, K, N))]
        yield (fmt, row["shape"], M, _kernel_name(M, fmt),
               *[(measured, modelled, measured / modelled if measured else None) for measured, modelled in pairs])


def _kernel_name(M: int, fmt: str) -> str:
    """The fused kernel a GPU runs for (M, fmt), the integer-dot GEMV told apart ("gemv int"): its time holds the
    launch that rounds x first, which the model leaves out."""
    kernel = fused_kernel(M, fmt, "bf16")
    return "gemv int" if kernel == "gemv" and uses_int_dots(fmt, "planes") else kernel


def _number(text: str) -> float | None:
    return float(text) if text else None


def summary(errors: list[tuple]) -> dict[str, tuple[int, float, float, float]]:
    """Per launch kind (the fused kernel's, "dequantize + matmul", "bf16 matmul"): count, median, min and max of
    measured / modelled."""
    groups: dict[str, list[float]] = {}
    for fmt, shape, M, kernel, fused, scratch, bf16 in errors:
        for name, (_, _, ratio) in ((f"fused {kernel}", fused), ("dequantize + matmul", scratch),
                                    ("bf16 matmul", bf16)):
            if ratio is not None:
                groups.setdefault(name, []).append(ratio)
    return {name: (len(r), statistics.median(r), min(r), max(r)) for name, r in groups.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model_error", description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, required=True, help="bench.kernels' CSV from a GPU run")
    parser.add_argument("--rows", type=Path, help="bench.sass --json rows for the GPU's architecture (default: the "
                        "first bench/results/sass-sm*.json that has them)")
    parser.add_argument("--gpu", choices=list(GPUS), help="the model's GPU (default: from the CSV's device name)")
    args = parser.parse_args(argv)
    try:
        measured = measured_rows(args.csv)
        gpu_name = args.gpu or gpu_of_device(measured[0]["device"])
    except (OSError, ValueError, KeyError) as error:
        parser.exit(2, f"python -m bench.model_error: error: {error}\n")
    gpu = GPUS[gpu_name]
    paths = [args.rows] if args.rows else sorted(RESULTS.glob("sass-sm*.json"))
    model = rows_path = None
    for rows_path in paths:
        try:
            model = LaunchModel(json.loads(rows_path.read_text()), gpu)
        except (OSError, ValueError) as error:
            parser.exit(2, f"python -m bench.model_error: error: {rows_path}: {error}\n")
        if model.has_baseline():
            break
    if model is None or not model.has_baseline():
        parser.exit(2, f"python -m bench.model_error: error: no sm_{gpu[0]} rows in "
                       f"{', '.join(map(str, paths)) or RESULTS}\n")
    errors = list(error_rows(measured, model))
    print(f"Measured ({args.csv.name}, {measured[0]['device']}) over the {gpu_name} model ({rows_path.name}); "
          "above 1 the model was optimistic\n")
    print("| format | shape | M | fused kernel | fused ms | model | ratio | dequantize + matmul ms | model | ratio | "
          "bf16 ms | model | ratio |")
    print("|---|---|---:|---|" + "---:|" * 9)
    for fmt, shape, M, kernel, *pairs in errors:
        cells = [f"{measured:.4f} | {modelled:.4f} | {ratio:.2f}" if measured else f"— | {modelled:.4f} | —"
                 for measured, modelled, ratio in pairs]
        print(f"| {fmt} | {shape} | {M} | {kernel} | " + " | ".join(cells) + " |")
    print("\n| launch | rows | median measured / model | min | max |\n|---|---:|---:|---:|---:|")
    for name, (count, median, low, high) in summary(errors).items():
        print(f"| {name} | {count} | {median:.2f} | {low:.2f} | {high:.2f} |")


if __name__ == "__main__":
    main()
