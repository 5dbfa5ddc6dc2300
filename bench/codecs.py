"""Throughput of the numpy reference codecs and the torch codecs on one Flux-like weight matrix, and the torch
dequantization against ComfyUI-GGUF's.

    python -m bench.codecs [--formats Q4_0,Q8_0] [--rows 3072] [--cols 3072] [--device cpu|cuda] [--threads N]
                           [--tables codecs,comfyui]

Prints markdown tables, everything measured in the same run:
- codecs: quantize and dequantize speed of each backend in M weights/s and the torch/numpy ratio; "—" where a
  backend has no codec for the format (yet). numpy always runs on the CPU.
- comfyui: `QTensor.dequantize` (the torch codecs) against ComfyUI-GGUF's torch dequantization
  (`bench.comfyui_gguf_baseline`, its algorithm re-implemented for this comparison) on the same bytes, into float32
  and into bfloat16, in ms per weight, timed alternately so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench import comfyui_gguf_baseline
from kernels import reference, torch_codecs
from kernels.formats import FORMATS, Format, get_format
from kernels.qtensor import QTensor

MISSING = "—"
TIME_BUDGET_S = 1.0  # per measurement: repeat while within it (at least once, at most MAX_RUNS) and keep the best
MAX_RUNS = 10
TABLES = ("codecs", "comfyui")


def has_codec(backend, fmt: Format, verb: str) -> bool:
    """Whether `backend` (the reference or torch codecs package) implements `verb` for `fmt`: its family module exists
    and defines the function, as the package's own lookup `_codec` finds it. Other import errors propagate."""
    try:
        backend._codec(fmt, verb)
    except ModuleNotFoundError as error:
        if error.name != f"{backend.__name__}.{fmt.family}":
            raise
        return False
    except (AttributeError, NotImplementedError):
        return False
    return True


def finished_on_return() -> None:
    """numpy, and torch on the CPU, compute synchronously: nothing to wait for."""


def measure(backend, fmt: Format, verb: str, data, wait):
    """(M weights/s, result) of `backend.<verb>(data, fmt)`: the best of up to MAX_RUNS timed calls, as many as fit in
    TIME_BUDGET_S (at least one); None where the backend lacks that codec."""
    if not has_codec(backend, fmt, verb):
        return None
    codec = getattr(backend, verb)
    # Warm-up at the measured size, so that what a first call at a size costs (the K-quant search's torch.compile,
    # the first touch of full-size temporaries, CUDA kernel loading) stays out of the timings: a first timed call
    # that slow uses up the time budget alone and is reported. The numpy reference compiles nothing: one row does.
    codec(data if backend is torch_codecs else data[:1], fmt.name)
    wait()
    times = []
    while not times or (sum(times) < TIME_BUDGET_S and len(times) < MAX_RUNS):
        start = time.perf_counter()
        result = codec(data, fmt.name)
        wait()
        times.append(time.perf_counter() - start)
    n_weights = data.shape[0] * (data.shape[1] if verb == "quantize" else fmt.elements(data.shape[1]))
    return n_weights / min(times) / 1e6, result


def speed(measured) -> str:
    return MISSING if measured is None else f"{measured[0]:,.0f}"


def ratio(torch_measured, numpy_measured) -> str:
    if torch_measured is None or numpy_measured is None:
        return MISSING
    return f"{torch_measured[0] / numpy_measured[0]:.1f}×"


def table_rows(formats: list[Format], weight: np.ndarray, device: torch.device):
    wait = torch.cuda.synchronize if device.type == "cuda" else finished_on_return
    weight_t = torch.from_numpy(weight).to(device)
    for fmt in formats:
        q_numpy = measure(reference, fmt, "quantize", weight, finished_on_return)
        q_torch = measure(torch_codecs, fmt, "quantize", weight_t, wait)
        dq_numpy = dq_torch = None
        # both dequantizers read the same bytes, from whichever quantizer exists (the reference has them all)
        if q_numpy is not None or q_torch is not None:
            raw = q_numpy[1] if q_numpy is not None else q_torch[1].cpu().numpy()
            dq_numpy = measure(reference, fmt, "dequantize", raw, finished_on_return)
            dq_torch = measure(torch_codecs, fmt, "dequantize", torch.from_numpy(raw).to(device), wait)
        yield (fmt.name, f"{fmt.bits_per_weight:g}", speed(q_numpy), speed(q_torch), ratio(q_torch, q_numpy),
               speed(dq_numpy), speed(dq_torch), ratio(dq_torch, dq_numpy))


def best_alternating(calls, wait) -> list[float]:
    """Best seconds of each of `calls`, run one after another in turn (after one warm-up round) until TIME_BUDGET_S
    per call is used (at least 3 rounds, at most MAX_RUNS): a busy machine slows them alike."""
    for call in calls:
        call()
    wait()
    times = [[] for _ in calls]
    while len(times[0]) < 3 or (sum(times[0]) < TIME_BUDGET_S and len(times[0]) < MAX_RUNS):
        for call, spent in zip(calls, times):
            start = time.perf_counter()
            call()
            wait()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def comfyui_rows(formats: list[Format], weight: torch.Tensor, wait):
    """Per format ComfyUI-GGUF dequantizes: its time and ours into float32 and bfloat16, and the speed-ups."""
    for fmt in formats:
        if fmt.name not in comfyui_gguf_baseline.FORMATS_COVERED:
            continue
        qtensor = QTensor.quantize(weight, fmt.name)
        row = [fmt.name]
        for dtype in (torch.float32, torch.bfloat16):
            theirs, ours = best_alternating([lambda: comfyui_gguf_baseline.dequantize(qtensor.raw, fmt.name, dtype),
                                             lambda: qtensor.dequantize(dtype)], wait)
            row += [f"{theirs * 1e3:.1f}", f"{ours * 1e3:.1f}", f"{theirs / ours:.1f}×"]
        yield row


def print_table(header, rows) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codecs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated format names (default: all)")
    parser.add_argument("--rows", type=int, default=3072, help="rows of the weight matrix (default: %(default)s)")
    parser.add_argument("--cols", type=int, default=3072,
                        help="its row length, a multiple of every benchmarked block size (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the torch codecs run")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--tables", default=",".join(TABLES),
                        help="which tables, comma-separated: codecs (numpy vs torch), comfyui (dequantization vs "
                             "ComfyUI-GGUF's) (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        formats = [get_format(name.strip()) for name in args.formats.split(",")]
        for fmt in formats:
            fmt.row_bytes(args.cols)
    except ValueError as error:
        parser.error(str(error))
    tables = [name.strip() for name in args.tables.split(",")]
    if not tables or set(tables) - set(TABLES):
        parser.error(f"--tables: choose from {', '.join(TABLES)}, got {args.tables!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    weight = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} thread(s)"
    print(f"{args.rows}×{args.cols} float32 weight (normal × 0.02); M weights/s, best of up to {MAX_RUNS} runs; "
          f"numpy {np.__version__} on CPU (1 thread), torch {torch.__version__} on {where}\n")
    if "codecs" in tables:
        print_table(("format", "bits/weight", "quantize numpy", "quantize torch", "torch/numpy",
                     "dequantize numpy", "dequantize torch", "torch/numpy"), table_rows(formats, weight, device))
    if "comfyui" in tables:
        wait = torch.cuda.synchronize if device.type == "cuda" else finished_on_return
        print(f"\nDequantization, ms per {args.rows}×{args.cols} weight: ComfyUI-GGUF's torch code (its default "
              f"configuration: fp16 arithmetic, then cast) vs QTensor.dequantize, alternately, best of up to "
              f"{MAX_RUNS}\n")
        print_table(("format", "ComfyUI-GGUF → f32", "ours → f32", "speed-up", "ComfyUI-GGUF → bf16", "ours → bf16",
                     "speed-up"), comfyui_rows(formats, torch.from_numpy(weight).to(device), wait))


if __name__ == "__main__":
    main()
