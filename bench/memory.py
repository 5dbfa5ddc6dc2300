"""Transformer bytes per GGUF preset and the VRAM planner's placement on common GPUs (Flux-dev shapes, no weights).

`python -m bench.memory` prints, for every converter preset, the transformer's stored size (what a GGUF file of that
preset holds, tensors only), what stays on the GPU once `Flux.offload_modulation_weights` has moved the embedders
and adaLN Linears away (their outputs precomputed for all steps by `precompute_modulations`; the loader keeps
unquantized tensors in bf16), the planner's predicted peak for a whole resident 1024x1024 run (`engine.memory`:
activations, modulations, VAE decode, CUDA context and reserve included), and per card size whether the planner
keeps the transformer resident or streams blocks from CPU memory. Counted from meta-device models built for each
preset; the activation formulas are checked against measurements in tests/test_memory_plan.py, the context and
allocator allowances are not yet measured on a GPU.
"""

from __future__ import annotations

import argparse

import torch

from engine.memory import GiB, InsufficientMemoryError, flux_for_preset, plan_memory, transformer_bytes
from engine.presets import PRESETS, tensor_format
from flux_model import Flux, FluxConfig
from kernels.formats import get_format

CARDS_GB = (24, 16, 12, 10, 8, 6)


def stored_bytes(name: str, shape, preset) -> int:
    fmt = get_format(tensor_format(name, shape, preset))
    return fmt.row_bytes(shape[-1]) * (torch.Size(shape).numel() // shape[-1])


def placement(model: Flux, gb: int, width: int, height: int) -> str:
    try:
        plan = plan_memory(model, width=width, height=height, budget=gb * GiB)
    except InsufficientMemoryError as e:
        return f"needs {e.minimum / GiB:.1f}"
    streamed = len(plan.streamed_double) + len(plan.streamed_single)
    tiles = "" if plan.vae_tile is None else ", tiled VAE"
    return (f"streams {streamed}" if streamed else "resident") + tiles


def memory_table(config: FluxConfig, width: int = 1024, height: int = 1024, cards=CARDS_GB) -> list[dict]:
    """One row per preset; the planner's placement for each card size in `cards` (GiB)."""
    with torch.device("meta"):
        dense = Flux(config)
    rows = []
    for preset_name, preset in PRESETS.items():
        stored = sum(stored_bytes(name, tuple(p.shape), preset) for name, p in dense.named_parameters())
        model = flux_for_preset(config, preset_name)
        resident = transformer_bytes(model).total
        peak = plan_memory(model, width=width, height=height, budget=1 << 50).peak
        rows.append(dict(preset=preset_name, file_gb=stored / 1e9, resident_gb=resident / 1e9,
                         ratio=resident / stored, peak_gib=peak / GiB,
                         **{f"{gb} GB": placement(model, gb, width, height) for gb in cards}))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--schnell", action="store_true", help="Flux-schnell instead of Flux-dev")
    parser.add_argument("--size", type=int, default=1024, help="image width and height (default 1024)")
    args = parser.parse_args(argv)
    config = FluxConfig.schnell() if args.schnell else FluxConfig.dev()
    print(f"Flux-{'schnell' if args.schnell else 'dev'} transformer, {args.size}x{args.size}, batch 1, 512 text "
          f"tokens, bf16 activations. stored / resident: GB = 1e9 bytes, tensors only; peak and cards: GiB. "
          f"Cards: the planner's placement for a card of that size (\"streams N\": N of 57 blocks streamed from "
          f"pinned CPU memory; \"needs X\": does not fit, X GiB needed)\n")
    cards = " | ".join(f"{gb} GB" for gb in CARDS_GB)
    print(f"| preset | stored | resident after precompute | resident / stored | predicted peak, resident | {cards} |")
    print("|---|---:|---:|---:|---:|" + "---|" * len(CARDS_GB))
    for row in memory_table(config, args.size, args.size):
        placements = " | ".join(row[f"{gb} GB"] for gb in CARDS_GB)
        print(f"| {row['preset']} | {row['file_gb']:.2f} GB | {row['resident_gb']:.2f} GB | {row['ratio']:.3f} | "
              f"{row['peak_gib']:.2f} GiB | {placements} |")


if __name__ == "__main__":
    main()
