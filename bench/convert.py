"""Converter quantization throughput on Flux's weight shapes, 1 process vs N worker processes, and the projected time
to convert full Flux-dev.

    python -m bench.convert [--types Q4_K,Q8_0] [--shapes 3072x3072,12288x3072] [--workers N] [--chunks C]

Each measurement quantizes C row chunks (the converter's own chunks of ~1M weights, `engine.convert.CHUNK_ELEMENTS`)
of a random normal * 0.02 float32 matrix of the given (out x in) shape through `engine.convert.encode`, the code path
the converter runs: in this process (1 torch thread, as the converter sets it) and with a pool of N spawned workers
(started and warmed before timing; the converter sends only K-quant and IQ rows to workers, so legacy types run
in-process in both columns). Both results must be byte-identical. One timed run each: the numbers are as noisy
as the machine. The projection covers the 304 quantized block weights of Flux-dev (11.83 of its 11.90B weights), each
at the rate measured for the shape with the nearest row length; the F32/F16 leftovers (~0.07B weights, cheap) and
file writing are not included.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engine.convert import CHUNK_ELEMENTS, PRESETS, default_workers, encode, stop_pool, warm_up, worker_pool
from kernels.formats import get_format

DEFAULT_SHAPES = "3072x3072,3072x12288,12288x3072,3072x9216"
HIDDEN, MLP, DEPTH, DEPTH_SINGLE = 3072, 12288, 19, 38


def flux_dev_block_weights() -> list[tuple[str, tuple[int, int], int]]:
    """(name, (out, in), count) of Flux-dev's quantized block weights: 304 tensors."""
    h, m = HIDDEN, MLP
    return [
        ("double mod.lin", (6 * h, h), 2 * DEPTH), ("double attn.qkv", (3 * h, h), 2 * DEPTH),
        ("double attn.proj", (h, h), 2 * DEPTH), ("double mlp.0", (m, h), 2 * DEPTH),
        ("double mlp.2", (h, m), 2 * DEPTH), ("single linear1", (3 * h + m, h), DEPTH_SINGLE),
        ("single linear2", (h, h + m), DEPTH_SINGLE), ("single modulation.lin", (3 * h, h), DEPTH_SINGLE),
    ]


def quantized_types() -> list[str]:
    seen = []
    for p in PRESETS.values():
        for t in (p.block, p.qkv):
            if get_format(t).is_quantized and t not in seen:
                seen.append(t)
    return seen


def timed(x: torch.Tensor, fmt: str, pool) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    ((_, raw),) = list(encode([("w", x, fmt)], pool))
    return time.perf_counter() - start, raw


def projected_seconds(rates: dict[int, float], name_filter=lambda name: True) -> float:
    """Seconds for the Flux-dev block weights selected by `name_filter`, at the measured M weights/s per row length."""
    total = 0.0
    for name, (n_out, n_in), count in flux_dev_block_weights():
        if name_filter(name):
            k = min(rates, key=lambda measured_k: abs(measured_k - n_in))
            total += count * n_out * n_in / (rates[k] * 1e6)
    return total


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(quantized_types()), help="block types (default: all presets')")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="OUTxIN weight shapes (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=max(2, default_workers()), help="pool size (default: cores)")
    parser.add_argument("--chunks", type=int, default=0, help="row chunks per measurement (default: 2 per worker)")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    for t in types:
        get_format(t)
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
    chunks = args.chunks or 2 * args.workers
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)

    pool = worker_pool(args.workers)
    try:
        # start every worker and compile what the measurements use, here and in the workers, before timing anything
        warm_up(types, None)
        if pool is not None:
            warm_up(types, pool)
        print(f"# `python -m bench.convert`: row chunks of ~{CHUNK_ELEMENTS / 1e6:.2f}M weights, {chunks} chunks per "
              f"measurement, 1 process (1 torch thread) vs {args.workers} workers (spawned, 1 thread each)\n")
        print(f"| type | shape (out×in) | rows measured | 1 process M w/s | {args.workers} workers M w/s | ratio |")
        print("|---|---|---:|---:|---:|---:|")
        rates: dict[str, dict[str, dict[int, list[float]]]] = {}
        for fmt in types:
            for n_out, n_in in shapes:
                rows = min(n_out, chunks * max(1, CHUNK_ELEMENTS // n_in))
                x = torch.randn(rows, n_in, generator=generator) * 0.02
                t1, raw1 = timed(x, fmt, None)
                tn, rawn = timed(x, fmt, pool)
                if not np.array_equal(raw1, rawn):
                    raise AssertionError(f"{fmt} {n_out}x{n_in}: workers gave different bytes")
                r1, rn = x.numel() / t1 / 1e6, x.numel() / tn / 1e6
                for mode, r in (("1", r1), ("n", rn)):
                    rates.setdefault(fmt, {}).setdefault(mode, {}).setdefault(n_in, []).append(r)
                print(f"| {fmt} | {n_out}×{n_in} | {rows} | {r1:.1f} | {rn:.1f} | {rn / r1:.2f}× |", flush=True)
    finally:
        if pool is not None:
            stop_pool(pool)

    def mean_rates(fmt, mode):
        return {k: float(np.mean(v)) for k, v in rates[fmt][mode].items()}

    print(f"\nProjected Flux-dev conversion time (304 block weights, 11.83B weights; quantization only):\n")
    print(f"| preset | block / qkv type | 1 process | {args.workers} workers |")
    print("|---|---|---:|---:|")
    for name, p in PRESETS.items():
        if not get_format(p.block).is_quantized or p.block not in rates or p.qkv not in rates:
            continue
        cells = []
        for mode in ("1", "n"):
            seconds = (projected_seconds(mean_rates(p.block, mode), lambda n: n != "double attn.qkv")
                       + projected_seconds(mean_rates(p.qkv, mode), lambda n: n == "double attn.qkv"))
            cells.append(minutes(seconds))
        print(f"| {name} | {p.block} / {p.qkv} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
