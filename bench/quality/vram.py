"""What every level needs on a real Flux-dev at 1024x1024, from the memory planner (no weights needed), and what a
24 / 16 / 12 / 10 / 8 / 6 GB card should run.

Streaming's cost is predicted with a stated throughput model, not measured: a step computes Flux-dev's FLOPs at half
the card's dense fp16/bf16 tensor rate (fp32 accumulation), and the streamed blocks cross PCIe at the card's link
rate; the copy overlaps the compute (`engine.streaming`), so a step takes the longer of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.quality.levels import REFERENCE, level_format, stored_bytes
from engine.memory import GiB, InsufficientMemoryError, flux_with_formats, plan_memory, transformer_bytes
from flux_model import Flux, FluxConfig

WIDTH = HEIGHT = 1024
TXT_LEN = 512
TENSOR_CORE_UTILISATION = 0.5


@dataclass(frozen=True)
class CardClass:
    gb: int
    example: str
    tflops: float  # dense fp16/bf16 tensor-core rate with fp32 accumulation (vendor spec), TFLOP/s
    pcie_gbps: float  # host-to-device copy rate of pinned memory, GB/s (about 80% of the link's)


CARDS = (
    CardClass(24, "RTX 4090", 165.2, 25.0),  # PCIe 4.0 x16
    CardClass(16, "RTX 4060 Ti 16 GB", 44.1, 12.5),  # PCIe 4.0 x8
    CardClass(12, "RTX 4070", 58.3, 25.0),
    CardClass(10, "RTX 3080 10 GB", 59.5, 25.0),
    CardClass(8, "RTX 4060", 30.2, 12.5),  # PCIe 4.0 x8
    CardClass(6, "RTX 2060", 25.8, 12.5),  # PCIe 3.0 x16
)


def step_flops(config: FluxConfig, img_tokens: int, txt_tokens: int) -> float:
    """Multiply-adds x 2 of one transformer forward: every block Linear over the tokens it sees, plus attention."""
    h = config.hidden_size
    mlp = int(h * config.mlp_ratio)
    tokens = img_tokens + txt_tokens
    double_linear = 3 * h * h + h * h + 2 * h * mlp  # qkv, proj, MLP of one stream
    single_linear = h * (3 * h + mlp) + (h + mlp) * h  # linear1, linear2
    attention = 2 * tokens * tokens * h  # QK^T and AV
    flops = config.depth * (2 * tokens * double_linear + 2 * attention)
    flops += config.depth_single_blocks * (2 * tokens * single_linear + 2 * attention)
    return float(flops)


def level_transformer(config: FluxConfig, level: str) -> Flux:
    return flux_with_formats(config, lambda name, shape: level_format(level, name, shape))


def streamed_bytes(model: Flux, plan) -> int:
    sizes = transformer_bytes(model)
    return sum(sizes.double[i] for i in plan.streamed_double) + sum(sizes.single[i] for i in plan.streamed_single)


def placement(model: Flux, card: CardClass, compute_seconds: float) -> dict:
    """The planner's choice for a card of this size: resident, streaming with a predicted slowdown, or too small."""
    try:
        plan = plan_memory(model, width=WIDTH, height=HEIGHT, txt_len=TXT_LEN, budget=card.gb * GiB)
    except InsufficientMemoryError as e:
        return {"fits": False, "needs_gib": e.minimum / GiB}
    pinned = streamed_bytes(model, plan)
    copy_seconds = pinned / (card.pcie_gbps * 1e9)
    return {"fits": True, "streamed_blocks": len(plan.streamed_double) + len(plan.streamed_single),
            "pinned_gb": pinned / 1e9, "tiled_vae": plan.vae_tile is not None, "peak_gib": plan.peak / GiB,
            "compute_seconds": compute_seconds, "copy_seconds": copy_seconds,
            "predicted_slowdown": max(compute_seconds, copy_seconds) / compute_seconds}


def flux_dev_memory(levels: list[str]) -> dict:
    """Per level (the BF16 reference first): stored and resident bytes, the predicted peak of a resident run, and
    the placement on every card class."""
    config = FluxConfig.dev()
    flops = step_flops(config, (WIDTH // 16) * (HEIGHT // 16), TXT_LEN)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Flux(config).named_parameters()}
    rows = {}
    for level in [REFERENCE, *levels]:
        fmt_level = "BF16" if level == REFERENCE else level
        model = level_transformer(config, fmt_level)
        peak = plan_memory(model, width=WIDTH, height=HEIGHT, txt_len=TXT_LEN, budget=1 << 50).peak
        rows[level] = {
            "stored_gb": stored_bytes(fmt_level, shapes) / 1e9, "resident_gb": transformer_bytes(model).total / 1e9,
            "peak_gib": peak / GiB,
            "cards": {card.gb: placement(model, card, flops / (card.tflops * 1e12 * TENSOR_CORE_UTILISATION))
                      for card in CARDS}}
    return {"flops_per_step": flops, "rows": rows}


def recommend(memory: dict, closeness: list[str]) -> list[dict]:
    """Per card class: the closest level (order `closeness`, best first, the reference included) that runs resident,
    and the closest that runs at all, streaming if it must, with its predicted slowdown."""
    out = []
    for card in CARDS:
        fits = [lv for lv in closeness if memory["rows"][lv]["cards"][card.gb]["fits"]]
        resident = [lv for lv in fits if memory["rows"][lv]["cards"][card.gb]["streamed_blocks"] == 0]
        best = fits[0] if fits else None
        out.append({"card": card, "resident": resident[0] if resident else None, "any": best,
                    "any_placement": memory["rows"][best]["cards"][card.gb] if best else None})
    return out
