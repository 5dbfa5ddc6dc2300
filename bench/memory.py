"""Resident transformer bytes per GGUF preset, before and after modulation precompute (Flux-dev shapes, no weights).

`python -m bench.memory` prints, for every converter preset, the transformer's stored size (what a GGUF file of that
preset holds, tensors only) and what stays in GPU memory once `Flux.offload_modulation_weights` has moved the
embedders and adaLN Linears away (their outputs precomputed for all steps by `precompute_modulations`).
Counted from the real Flux-dev tensor shapes on the `meta` device and the presets' storage types; activations,
the CUDA context and allocator slack are not included (those need a GPU run).
"""

from __future__ import annotations

import argparse

import torch

from engine.presets import PRESETS, tensor_format
from flux_model import Flux, FluxConfig
from kernels.formats import get_format


def stored_bytes(name: str, shape, preset) -> int:
    fmt = get_format(tensor_format(name, shape, preset))
    return fmt.row_bytes(shape[-1]) * (torch.Size(shape).numel() // shape[-1])


def memory_table(config: FluxConfig) -> list[dict]:
    with torch.device("meta"):
        model = Flux(config)
    vec_names = {f"{prefix}.{name}" for prefix, module in model.named_modules() if module in model.vec_modules()
                 for name, _ in module.named_parameters()}
    rows = []
    for preset_name, preset in PRESETS.items():
        total = offloaded = 0
        for name, p in model.named_parameters():
            size = stored_bytes(name, tuple(p.shape), preset)
            total += size
            offloaded += size if name in vec_names else 0
        rows.append(dict(preset=preset_name, file_gb=total / 1e9, resident_gb=(total - offloaded) / 1e9,
                         ratio=(total - offloaded) / total))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schnell", action="store_true", help="Flux-schnell instead of Flux-dev")
    args = parser.parse_args(argv)
    config = FluxConfig.schnell() if args.schnell else FluxConfig.dev()
    print(f"Flux-{'schnell' if args.schnell else 'dev'} transformer weights (GB = 1e9 bytes), tensors only\n")
    print("| preset | stored | resident after modulation precompute | resident / stored |")
    print("|---|---:|---:|---:|")
    for row in memory_table(config):
        print(f"| {row['preset']} | {row['file_gb']:.2f} GB | {row['resident_gb']:.2f} GB | {row['ratio']:.3f} |")


if __name__ == "__main__":
    main()
