"""`python -m bench.quality`: which quantization level comes closest to full precision, at what memory and speed.

    python -m bench.quality                                  # the shipped demo model at every level, NF4 and FP8
    python -m bench.quality --reference flux1-dev.safetensors --ae ae.safetensors --clip clip_l.safetensors \\
        --t5 t5xxl_fp16.safetensors --levels Q8_0,Q4_0,NF4   # converted from the reference (cached)
    python -m bench.quality --reference flux1-dev.safetensors ... --files flux1-dev-Q4_K_S.gguf other.gguf

Every level runs the same prompts x seeds as the reference and is compared with it: image PSNR and SSIM, final-latent
cosine similarity and relative RMSE, the latent error after every step, each with its spread over runs; per-layer
weight errors by kind; s/step and bytes. For Flux-dev at 1024x1024 the planner gives every level's VRAM and a
recommendation per card size. Writes report.md, grid.png, three plots and results.json into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bench import demo_world
from bench.quality import levels as lv
from bench.quality import metrics, report, runs, vram
from engine.errors import ModelFileError
from engine.loading import load_flux
from engine.memory import transformer_bytes
from engine.pipeline import FluxPipeline
from flux_model import Flux

DEFAULT_CACHE = Path.home() / ".cache" / "flux-quant-engine" / "quality"
# for a user's Flux: varied subjects, text, textures and a plain background
GENERAL_PROMPTS = (
    "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road at sunset",
    "a bowl of ramen, studio lighting", "a sign that says 'quantized' in bold letters",
    "an oil painting of a lighthouse in a storm", "a close-up of a knitted wool sweater",
    "a watercolor map of an island", "a blue ceramic vase on a white background",
)


def demo_prompts(count: int) -> tuple[str, ...]:
    """Held-out combinations of the demo's world (never seen in training), spread over the list."""
    combinations = demo_world.held_out_combinations()
    chosen = [combinations[round(i * len(combinations) / count) % len(combinations)] for i in range(count)]
    return tuple(demo_world.Scene(c, s, b, 0, 0, 0).prompt for c, s, b in chosen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--reference", type=Path, help="full-precision transformer (BF16/FP16 file or folder); "
                                                       "default: the shipped demo model")
    parser.add_argument("--ae", type=Path)
    parser.add_argument("--clip", type=Path)
    parser.add_argument("--t5", type=Path)
    parser.add_argument("--clip-tokenizer", type=Path)
    parser.add_argument("--t5-tokenizer", type=Path)
    parser.add_argument("--levels", help=f"comma-separated levels (default: {','.join(lv.LEVELS)})")
    parser.add_argument("--files", type=Path, nargs="+", help="quantized transformer files to compare instead")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--size", type=int, help="image width and height (default: the model's)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("quality-report"), help="output folder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"converted levels and reference outputs (default {DEFAULT_CACHE})")
    return parser


def reference_pipeline(args, device: torch.device, dtype: torch.dtype) -> FluxPipeline:
    if args.reference is None:
        from engine.demo import load_pipeline

        return load_pipeline(device=device, dtype=dtype, prompt_cache=False, transformer="transformer_bf16")
    missing = [flag for flag in ("ae", "clip", "t5") if getattr(args, flag) is None]
    if args.reference.is_dir():
        return FluxPipeline.from_folder(args.reference, device=device, dtype=dtype, prompt_cache=False)
    if missing:
        raise SystemExit(f"python -m bench.quality: --reference needs --{', --'.join(missing)} (or a diffusers folder)")
    return FluxPipeline.from_files(args.reference, args.ae, args.clip, args.t5, device=device, dtype=dtype,
                                   clip_tokenizer=args.clip_tokenizer, t5_tokenizer=args.t5_tokenizer,
                                   prompt_cache=False)


def dense_weights(model: Flux) -> dict[str, torch.Tensor]:
    """Every block Linear's weight as float32 (decoded where quantized)."""
    out = {}
    for name, module in model.named_modules():
        if metrics.tensor_kind(f"{name}.weight") is not None:
            out[f"{name}.weight"] = metrics.dense_value(module.weight)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.files:
        level_names = [f.stem for f in args.files]
    else:
        level_names = [lv.check_level(x.strip()) for x in (args.levels or ",".join(lv.LEVELS)).split(",") if x.strip()]
    ref_pipe = reference_pipeline(args, device, dtype)
    reference_path = Path(ref_pipe.files["transformer"])
    demo = args.reference is None
    settings = runs.RunSettings(
        prompts=(demo_prompts if demo else lambda n: (GENERAL_PROMPTS * n)[:n])(args.prompts),
        seeds=tuple(range(args.seeds)), steps=args.steps or ref_pipe.defaults.steps,
        width=args.size or ref_pipe.defaults.width, height=args.size or ref_pipe.defaults.height)
    cache = args.cache / lv.cache_key(reference_path)
    n_runs = len(settings.runs())
    results = {"reference": "the shipped demo model, " + reference_path.name if demo else str(args.reference),
               "demo": demo, "device": str(device), "dtype": str(dtype),
               "settings": {"prompts": list(settings.prompts), "seeds": list(settings.seeds), "steps": settings.steps,
                            "width": settings.width, "height": settings.height,
                            "true_cfg": ref_pipe.defaults.true_cfg, "guidance": ref_pipe.defaults.guidance},
               "levels": {}}
    reference_weights = dense_weights(ref_pipe.transformer)
    with tqdm(total=n_runs * (1 + len(level_names)), desc="quality", unit="image", dynamic_ncols=True) as bar:
        references = runs.reference_outputs(ref_pipe, settings, cache, bar)
        runs.generate(ref_pipe, *settings.runs()[0], settings)  # timed here: the outputs may have come from the cache
        results["reference_seconds_per_step"] = ref_pipe.timings["per_step"]
        images = {lv.REFERENCE: [references[i].image for i in range(0, n_runs, len(settings.seeds))]}
        for i, name in enumerate(level_names):
            bar.set_postfix_str(name)
            if args.files:
                model, nbytes = load_flux(args.files[i], dtype=dtype), args.files[i].stat().st_size
            else:
                model, nbytes = lv.level_model(reference_path, name, cache, dtype)
            pipe = FluxPipeline(model, ref_pipe.ae, ref_pipe.conditioner, device, dtype, defaults=ref_pipe.defaults)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            level = runs.compare_level(pipe, settings, references, bar)
            images[name] = level.pop("images")
            level.update(stored_bytes=nbytes, resident_bytes=transformer_bytes(model).total,
                         weight_errors=metrics.weight_errors(reference_weights, dense_weights(model)),
                         bits_per_weight=None if args.files else lv.block_bits_per_weight(name),
                         peak_vram_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                         else None)
            results["levels"][name] = level
            del pipe, model
    results["reference_stored_bytes"] = reference_path.stat().st_size if reference_path.is_file() else None
    results["flux_dev_weight_errors"] = {} if args.files else metrics.flux_dev_weight_errors(level_names)
    results["flux_dev_memory"] = vram.flux_dev_memory([] if args.files else level_names)
    report.write(args.out, results, images, list(settings.prompts))
    print(f"wrote {args.out}/report.md, grid.png, psnr_vs_bits.png, latent_error_vs_step.png, vram_per_level.png, "
          f"results.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ModelFileError, ValueError) as e:
        print(f"python -m bench.quality: {e}", file=sys.stderr)
        sys.exit(2)
