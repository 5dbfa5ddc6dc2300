"""Per-step time of the Flux denoising loop per preset, and the planner's predicted peak against the measured one:
`python -m bench.pipeline`.

Random weights stored in each preset's formats (valid blocks: a quantized band of random rows repeated down the
weight, so building Flux-dev on a GPU takes seconds) run BFL's Euler loop with precomputed modulations, as the
pipeline does. On CUDA: Flux-dev shapes at --size, peak VRAM measured (torch.cuda.max_memory_allocated) against
`plan_memory`'s denoising peak (without the CUDA context, which torch does not count). On the CPU: a small Flux (hidden
256, the demo's shape class) at 64x64 pixels, time only. Ratios are against BF16 measured in the same run.

`--compile` also times each preset's model under `torch.compile` (quantized Linears are the custom operator
`flux_quant::linear`, so the whole forward is one graph): a first run compiles, the second is timed, against eager.

`--lora-presets Q8_0,...` adds a table per preset: 0, 1 and 4 random rank-32 LoRAs on every block Linear, applied at
run time (`LoRALinear`) or merged into the weights, ratios against no LoRA on the same model in the same run, and the
time applying them took (merge: decode, add, requantize on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from engine import sampling
from engine.lora import LoRA, LoRAStack, LoRAUpdate
from engine.lora.runtime import linear_modules
from engine.memory import CUDA_CONTEXT_BYTES, GiB, plan_memory
from engine.presets import PRESETS, tensor_format
from engine.streaming import apply_plan
from flux_model import Flux, FluxConfig
from kernels.formats import get_format
from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear

SMALL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=256, mlp_ratio=4.0,
                   num_heads=4, depth=2, depth_single_blocks=4, axes_dim=[8, 28, 28], theta=10_000, qkv_bias=True,
                   guidance_embed=True)
BAND_ROWS = 64  # rows quantized for real; repeated down the weight


def random_flux(config: FluxConfig, preset: str, device, dtype: torch.dtype, seed: int = 0) -> Flux:
    """A Flux with random weights held as a GGUF of `preset` would hold them (QuantLinears in the preset's formats)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Flux(config)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        n, k = module.weight.shape
        band = torch.randn(min(n, BAND_ROWS), k, generator=generator) / k**0.5
        bias = None if module.bias is None else torch.zeros(n, dtype=dtype, device=device)
        fmt = get_format(tensor_format(f"{name}.weight", (n, k), PRESETS[preset]))
        parent, _, leaf = name.rpartition(".")
        if fmt.is_quantized:
            q = QTensor.quantize(band, fmt.name)
            raw = q.raw.repeat((n + band.shape[0] - 1) // band.shape[0], 1)[:n].to(device)
            replacement = QuantLinear(QTensor(raw, fmt.name, (n, k)), bias)
        else:
            replacement = nn.Linear(k, n, bias=bias is not None, device=device, dtype=dtype)
            with torch.no_grad():
                replacement.weight.copy_(band.repeat((n + band.shape[0] - 1) // band.shape[0], 1)[:n])
                if bias is not None:
                    replacement.bias.zero_()
        setattr(model.get_submodule(parent), leaf, replacement)
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Parameter(torch.ones(p.shape, device=device, dtype=dtype),
                                                                    requires_grad=False))
    return model.eval().requires_grad_(False)


def time_steps(model: Flux, width: int, height: int, txt_len: int, steps: int, device, dtype) -> list[float]:
    config = model.params
    noise = sampling.get_noise(1, height, width, device, dtype, seed=0)
    txt = torch.randn(1, txt_len, config.context_in_dim, device=device, dtype=dtype)
    vec = torch.randn(1, config.vec_in_dim, device=device, dtype=dtype)
    inputs = sampling.prepare(noise, txt, vec)
    timesteps = sampling.get_schedule(steps, inputs["img"].shape[1])
    mods = model.precompute_modulations(torch.tensor(timesteps[:-1]), vec, torch.full((1,), 3.5), device=device)
    model.offload_modulation_weights("cpu")
    stamps = [time.perf_counter()]

    def tick(i, img):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    sampling.denoise(model, inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"], None, timesteps,
                     modulations=mods, callback=tick)
    return [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # the first step warms up (compiles, allocates)


def random_loras(model: Flux, count: int, rank: int, seed: int = 0) -> list[LoRA]:
    """`count` LoRAs of `rank` on every Linear inside the blocks (modulation Linears included), scale 1."""
    generator = torch.Generator().manual_seed(seed)
    loras = []
    for i in range(count):
        updates = tuple(LoRAUpdate(name, torch.randn(rank, m.in_features, generator=generator) / m.in_features**0.5,
                                   torch.randn(m.out_features, rank, generator=generator) * 0.01, scale=1.0)
                        for name, m in block_linears(model).items())
        loras.append(LoRA(f"random-{i}", "", "bfl", updates))
    return loras


def block_linears(model: Flux) -> dict[str, nn.Module]:
    return {name: m for name, m in linear_modules(model).items() if name.startswith(("double_blocks.",
                                                                                      "single_blocks."))}


def lora_flops_share(model: Flux, rank: int) -> float:
    """Extra multiply-adds of a rank-`rank` LoRA on every block Linear per token, over the Linears' own (modulation
    Linears left out: they run once per step, not per token)."""
    linears = [m for name, m in block_linears(model).items() if not name.endswith(("mod.lin", "modulation.lin"))]
    return sum(rank * (m.in_features + m.out_features) for m in linears) / sum(m.in_features * m.out_features
                                                                                for m in linears)


def lora_rows(model: Flux, loras: list[LoRA], modes: list[str], rounds: int, size: int, txt_len: int, steps: int,
              device, dtype, budget) -> list[tuple[int, str, float, float]]:
    """(LoRAs, mode, fastest s/step, seconds applying them) for 0 LoRAs, then 1 and all of `loras` in each mode. The
    configurations take turns for `rounds` rounds, and the fastest step of each counts: load from other processes
    only ever adds time, and on a shared machine it comes and goes over minutes."""
    stack = LoRAStack(model)
    configs = [(0, "none")] + [(n, mode) for mode in modes for n in (1, len(loras))]
    times: dict[tuple[int, str], list[float]] = {config: [] for config in configs}
    applied: dict[tuple[int, str], float] = {}
    for _ in range(rounds):
        for count, mode in configs:
            stack.clear()
            stack.set_mode("runtime")
            start = time.perf_counter()
            for lora in loras[:count]:
                stack.add(lora)
            stack.set_mode(mode if count else "runtime")
            applied[count, mode] = time.perf_counter() - start
            plan = plan_memory(model, width=size, height=size, txt_len=txt_len, num_steps=steps, budget=budget,
                               device=device)
            handle = apply_plan(model, plan, device)
            times[count, mode] += time_steps(model, size, size, txt_len, steps, device, dtype)
            handle.remove()
    stack.clear()
    return [(count, mode, min(times[count, mode]), applied[count, mode]) for count, mode in configs]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="BF16,Q8_0,Q6_K,Q5_K_S,Q4_K_S,Q4_0,Q3_K_S,Q2_K",
                        help="comma-separated converter presets (default: BF16 first, then a spread of levels)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: 1024 on CUDA, 64 on the CPU)")
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per preset (the first is not timed)")
    parser.add_argument("--vram", type=float, help="plan for this budget in GB (CUDA; default: free VRAM)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every preset under torch.compile (compiles once per preset: minutes)")
    parser.add_argument("--lora-presets", default="",
                        help="comma-separated presets to time with 0, 1 and 4 LoRAs on every block Linear (default: "
                             "none)")
    parser.add_argument("--lora-rank", type=int,
                        help="rank of each LoRA (default: 32 on CUDA; on the CPU 32 scaled to the small Flux's width, "
                             "which keeps Flux-dev's share of extra FLOPs)")
    parser.add_argument("--lora-modes", default="runtime,merge",
                        help="LoRA modes to time: runtime, merge or both (default: both; merge requantizes every "
                             "block Linear on the CPU, minutes for Flux-dev)")
    parser.add_argument("--lora-rounds", type=int, default=3,
                        help="rounds in which the LoRA configurations take turns (default 3)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = FluxConfig.dev() if cuda else SMALL
    size = args.size or (1024 if cuda else 64)
    txt_len = 512 if cuda else 16
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"Flux {'dev' if cuda else 'small (hidden 256, 2+4 blocks)'} at {size}x{size}, {txt_len} text tokens, "
          f"{dtype}, on {where}; median of {args.steps - 1} timed steps\n")
    compiled_columns = " compiled s/step | compiled vs eager |" if args.compile else ""
    print(f"| preset | s/step | vs BF16 | predicted peak | measured peak | streamed blocks |{compiled_columns}")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.compile else ""))
    baseline = None
    for preset in args.presets.split(","):
        model = random_flux(config, preset, "cpu" if cuda else device, dtype)
        budget = int(args.vram * GiB) if args.vram else (None if cuda else 2**62)
        plan = plan_memory(model, width=size, height=size, txt_len=txt_len, num_steps=args.steps, budget=budget,
                           device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        handle = apply_plan(model, plan, device)
        per_step = statistics.median(time_steps(model, size, size, txt_len, args.steps, device, dtype))
        compiled = ""
        if args.compile:
            fast = torch.compile(model)
            time_steps(fast, size, size, txt_len, args.steps, device, dtype)  # compiles (the step index goes dynamic)
            fast_step = statistics.median(time_steps(fast, size, size, txt_len, args.steps, device, dtype))
            compiled = f" {fast_step:.4f} | {fast_step / per_step:.2f} |"
        handle.remove()
        baseline = baseline or per_step
        if cuda:
            context = CUDA_CONTEXT_BYTES if args.vram else 0  # counted inside a named budget, never by torch
            predicted = f"{(plan.phase_peak('denoising') - context) / GiB:.2f} GiB"
            measured = f"{torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB"
        else:
            predicted = measured = "n/a (CPU)"
        streamed = len(plan.streamed_double) + len(plan.streamed_single)
        print(f"| {preset} | {per_step:.4f} | {per_step / baseline:.2f} | {predicted} | {measured} | {streamed} |"
              f"{compiled}")
        del model, handle
    rank = args.lora_rank or max(1, round(32 * config.hidden_size / FluxConfig.dev().hidden_size))
    for preset in filter(None, args.lora_presets.split(",")):
        model = random_flux(config, preset, "cpu" if cuda else device, dtype)
        budget = int(args.vram * GiB) if args.vram else (None if cuda else 2**62)
        rows = lora_rows(model, random_loras(model, 4, rank), args.lora_modes.split(","), args.lora_rounds, size,
                         txt_len, args.steps, device, dtype, budget)
        print(f"\n{preset}: rank-{rank} LoRAs on every block Linear, {100 * lora_flops_share(model, rank):.1f}% more "
              f"Linear FLOPs each; fastest of {args.lora_rounds} x {args.steps - 1} timed steps\n")
        print("| LoRAs | mode | s/step | vs no LoRA | applied in |")
        print("|---:|---|---:|---:|---:|")
        for count, mode, per_step, applied in rows:
            print(f"| {count} | {mode} | {per_step:.4f} | {per_step / rows[0][2]:.3f} | {applied:.1f} s |")
        del model


if __name__ == "__main__":
    main()
