"""`python -m engine.generate "a prompt"`: images from the command line.

Without model flags it runs the small demo model that ships with the project. Prints the memory plan, a progress bar
with s/it, the time per step and the total; writes each PNG atomically with its parameters in PNG text chunks
("parameters" in the A1111 / Forge style that image viewers and other Flux tools read, and "flux-quant-engine" as
JSON, both listing the LoRAs and their weights). `--lora FILE[:WEIGHT]` (repeatable) stacks LoRAs, added at each
step or, with `--lora-mode merge`, baked into the weights. Any bad input exits with status 2 and one line naming the
problem, having written nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import torch
from PIL import PngImagePlugin

from engine import demo
from engine.errors import ModelFileError
from engine.lora import MODES
from engine.memory import InsufficientMemoryError
from engine.sampling import get_noise

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    """Bad input found before any work: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is enough
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.generate", description="Generate images with Flux.1 from quantized files.")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    p.add_argument("--model", type=Path, help="transformer: GGUF, safetensors (BFL, ComfyUI, diffusers, FP8, NF4) or a "
                                              "diffusers FLUX.1 folder (default: the shipped demo model)")
    p.add_argument("--t5", type=Path, help="T5 encoder: GGUF, safetensors or folder (not needed with a folder --model)")
    p.add_argument("--clip", type=Path, help="CLIP-L text encoder: safetensors or folder")
    p.add_argument("--clip-tokenizer", type=Path, help="CLIP tokenizer folder, where none is beside --clip")
    p.add_argument("--t5-tokenizer", type=Path, help="T5 tokenizer folder, where none is beside --t5 or inside it")
    p.add_argument("--ae", type=Path, help="autoencoder: BFL ae.safetensors")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 28 dev, 4 schnell, the demo's own)")
    p.add_argument("--guidance", type=float, help="distilled guidance of Flux-dev (default 3.5; schnell has none)")
    p.add_argument("--true-cfg", type=float, help="classifier-free guidance scale against --negative-prompt "
                                                  "(1 = off; two passes per step)")
    p.add_argument("--negative-prompt", default="", help="the negative prompt for --true-cfg (default: empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--prompts-file", type=Path, help="a text file with one prompt a line")
    p.add_argument("--out", type=Path, default=Path("outputs"),
                   help="output folder, or a .png file name for a single image (default: ./outputs)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--vram", type=float, help="GPU memory budget in GB (default: what the GPU has free)")
    p.add_argument("--plan", action="store_true", help="print the memory plan and exit (no GPU needed with --vram)")
    p.add_argument("--no-prompt-cache", action="store_true", help="don't read or write the prompt embedding cache")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA .safetensors (diffusers/PEFT, kohya, XLabs or BFL names) and its weight (default 1); "
                        "repeat the flag to stack several")
    p.add_argument("--lora-mode", choices=MODES, default="runtime",
                   help="runtime (default): LoRAs added at each step on top of the stored weights, exactly; merge: "
                        "baked into the weights once and requantized to their format (slower load, no cost per "
                        "step, lossy on quantized weights)")
    return p


def parse_lora(spec: str) -> tuple[Path, float]:
    """"style.safetensors:0.8" -> (path, 0.8); without ":WEIGHT" (or when the whole text names a file) weight 1."""
    path, colon, weight = spec.rpartition(":")
    if colon and not Path(spec).exists():
        try:
            value = float(weight)
        except ValueError:
            raise UsageError(f"--lora {spec}: the weight after ':' must be a number, got {weight!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"--lora {spec}: the weight must be a finite number")
        return Path(path), value
    return Path(spec), 1.0


def read_prompts(args) -> list[str]:
    if args.prompt is not None and args.prompts_file is not None:
        raise UsageError("give a prompt or --prompts-file, not both")
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {e}") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file {args.prompts_file} holds no prompt")
        return prompts
    if args.prompt is None and not args.plan:
        raise UsageError('no prompt: python -m engine.generate "a prompt" (or --prompts-file FILE)')
    return [args.prompt or ""]


def check_args(args) -> None:
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value < 16 or value % 16):
            raise UsageError(f"--{name} must be a positive multiple of 16, got {value}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    if args.vram is not None and args.vram <= 0:
        raise UsageError(f"--vram must be a positive number of GB, got {args.vram}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a device (cuda, cuda:N or cpu)") from None
        if device.type not in ("cuda", "cpu"):
            raise UsageError(f"--device {args.device!r}: only cuda and cpu are supported")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is available (use --device cpu)")
    for path, _ in map(parse_lora, args.lora):
        if not path.is_file():
            raise UsageError(f"--lora {path}: no such file")
    for flag in ("model", "t5", "clip", "ae", "clip_tokenizer", "t5_tokenizer"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.model is not None and not args.model.is_dir():
        missing = [f"--{f}" for f in ("ae", "clip", "t5") if getattr(args, f) is None]
        if missing:
            raise UsageError(f"with a single-file --model also pass {', '.join(missing)}")
    elif args.model is None and any(getattr(args, f) is not None for f in ("t5", "clip", "ae")):
        raise UsageError("--t5/--clip/--ae need --model too (without --model the shipped demo model runs)")
    if args.out.suffix.lower() == ".png":
        if not args.out.parent.is_dir():
            raise UsageError(f"--out {args.out}: folder {args.out.parent} does not exist")
    elif args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder (name a .png file or a folder)")
    elif not args.out.exists() and not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: its parent folder {args.out.parent} does not exist")


def load_pipeline(args, device: torch.device, dtype: torch.dtype):
    from engine.pipeline import FluxPipeline

    cache = not args.no_prompt_cache
    if args.model is None:
        return demo.load_pipeline(device=device, dtype=dtype, vram=args.vram, prompt_cache=cache)
    if args.model.is_dir():
        return FluxPipeline.from_folder(args.model, device=device, dtype=dtype, vram=args.vram, prompt_cache=cache)
    return FluxPipeline.from_files(args.model, args.ae, args.clip, args.t5, device=device, dtype=dtype,
                                   vram=args.vram, clip_tokenizer=args.clip_tokenizer,
                                   t5_tokenizer=args.t5_tokenizer, prompt_cache=cache)


def weight_formats(model: torch.nn.Module) -> str:
    """The transformer's storage formats by share of bytes, e.g. "Q8_0 93%, F32 7%"."""
    from kernels.quant_linear import QuantLinear

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    sizes: Counter = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            sizes[module.weight.format] += module.weight.nbytes
    for p in model.parameters():
        sizes[names.get(p.dtype, str(p.dtype))] += p.nbytes
    total = sum(sizes.values()) or 1
    return ", ".join(f"{fmt} {100 * n / total:.0f}%" for fmt, n in sizes.most_common() if n / total >= 0.005)


def engine_version() -> str:
    try:
        return metadata.version("flux-quant-engine")
    except metadata.PackageNotFoundError:
        return "unknown"


def _file_names(files: dict[str, str]) -> dict[str, str]:
    """The model files by name only: a picture that gets shared must not carry the folders of the machine that made
    it."""
    return {role: Path(path).name for role, path in files.items()}


def png_info(prompt: str, seed: int, params: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    a1111 = (f"{prompt}\n" + (f"Negative prompt: {params['negative_prompt']}\n" if params["true_cfg"] != 1 else "")
             + f"Steps: {params['steps']}, Sampler: Euler, Schedule type: {params['schedule']}, "
               f"CFG scale: {params['true_cfg']}, Distilled CFG Scale: {params['guidance']}, Seed: {seed}, "
               f"Size: {params['width']}x{params['height']}, Model: {Path(params['files']['transformer']).name}, "
               f"Model format: {params['transformer_formats']}"
             + "".join(f", LoRA: {lora['name']}:{lora['weight']:g}" for lora in params["loras"])
             + (f", LoRA mode: {params['lora_mode']}" if params["loras"] else "")
             + f", Version: flux-quant-engine {params['version']}")
    info.add_text("parameters", a1111)
    info.add_text("flux-quant-engine", json.dumps({"prompt": prompt, "seed": seed, **params}))
    return info


def write_png(image, path: Path, info: PngImagePlugin.PngInfo) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a PNG, and an interrupted run
    leaves nothing. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() == ".png":
        return [out] if count == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]
    existing = {p.name for p in out.glob("*.png")} if out.is_dir() else set()
    paths, n = [], 0
    while len(paths) < count:
        name = f"flux-{n:05d}.png"
        if name not in existing:
            paths.append(out / name)
        n += 1
    return paths


def run(args) -> int:
    prompts = read_prompts(args)
    check_args(args)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    started = time.perf_counter()
    pipe = load_pipeline(args, device, dtype)
    for path, weight in map(parse_lora, args.lora):
        lora = pipe.load_lora(path, weight)
        print(f"LoRA {lora.name} ({lora.format}) on {len(lora.modules)} Linear(s) at weight {weight:g}")
    pipe.lora_mode = args.lora_mode  # after loading them all: one merge
    if args.lora and args.lora_mode == "merge":
        print("LoRAs merged into the weights and requantized to their formats (lossy on quantized weights)")
    loaded = time.perf_counter()
    defaults = pipe.defaults
    width, height = args.width or defaults.width, args.height or defaults.height
    steps = args.steps or defaults.steps
    guidance = defaults.guidance if args.guidance is None else args.guidance
    if args.guidance is not None and not pipe.transformer.params.guidance_embed:
        print("warning: this model has no guidance embedding (schnell-style): --guidance is ignored", file=sys.stderr)
        guidance = defaults.guidance
    true_cfg = defaults.true_cfg if args.true_cfg is None else args.true_cfg

    plan = pipe.plan(width, height, args.num_images, steps)
    if args.plan or device.type == "cuda":
        print(plan.describe())
    if args.plan:
        return 0

    params = dict(steps=steps, guidance=guidance, true_cfg=true_cfg, negative_prompt=args.negative_prompt,
                  width=width, height=height, schedule="shifted" if defaults.shift else "linear",
                  files=_file_names(pipe.files), transformer_formats=weight_formats(pipe.transformer),
                  version=engine_version(), dtype=str(dtype).removeprefix("torch."),
                  loras=[lora | {"file": Path(lora["file"]).name} for lora in pipe.loras.describe()],
                  lora_mode=pipe.lora_mode)
    if args.out.suffix.lower() != ".png":
        args.out.mkdir(exist_ok=True)
    paths = output_paths(args.out, len(prompts) * args.num_images)
    print(f"loaded in {loaded - started:.1f} s on {device}; {steps} steps at {width}x{height}")
    written = 0
    for prompt in prompts:
        seeds = [args.seed + i for i in range(args.num_images)]
        latents = torch.cat([get_noise(1, height, width, device, dtype, s) for s in seeds])
        images = pipe([prompt] * args.num_images, width=width, height=height, steps=steps, guidance=guidance,
                      latents=latents, true_cfg=true_cfg, negative_prompt=args.negative_prompt)
        t = pipe.timings
        print(f"{t['per_step']:.3f} s/step, {t['total']:.1f} s for {len(images)} image(s) "
              f"(text {t['encode']:.2f} s, denoise {t['denoise']:.2f} s, decode {t['decode']:.2f} s)")
        for seed, image in zip(seeds, images):
            write_png(image, paths[written], png_info(prompt, seed, params))
            print(f"wrote {paths[written]}")
            written += 1
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


def main(argv=None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except (UsageError, ModelFileError, InsufficientMemoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
