"""Write the trained demo model (`python -m bench.train_demo`) into `engine/demo/` in the layouts users have:

- `flux-demo-bf16.safetensors`: the guidance-distilled transformer (EMA weights) with BFL names, BF16;
- `flux-demo-Q8_0.gguf`: the same converted by `engine.convert` (city96's layout);
- `ae.safetensors`: BFL-named autoencoder, its latent scale/shift and GroupNorm groups in the metadata;
- `clip_l.safetensors` (ComfyUI single-file layout, `text_model.*`) and `clip_tokenizer/`;
- `t5-demo-Q8_0.gguf`: a `t5encoder` GGUF (llama.cpp names) with its tokenizer in the metadata;
- `demo.json`: the files and the sampling settings the model was trained for.

    python -m bench.export_demo [--workdir demo-train] [--steps 20] [--guidance 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench import demo_world
from bench.train_demo import DemoConfig, distilled_weights
from engine.convert import convert
from engine.demo import DEMO_DIR, MANIFEST
from engine.text_encoders import save_t5_gguf

FILES = {"transformer": "flux-demo-Q8_0.gguf", "transformer_bf16": "flux-demo-bf16.safetensors",
         "ae": "ae.safetensors", "clip": "clip_l.safetensors", "clip_tokenizer": "clip_tokenizer",
         "t5": "t5-demo-Q8_0.gguf"}


def _save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def export(workdir: Path, out: Path, defaults: dict) -> None:
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    config = DemoConfig(**json.loads((workdir / "config.json").read_text()))
    out.mkdir(exist_ok=True)
    ema = load_file(str(distilled_weights(workdir)))
    _save({k: v.to(torch.bfloat16) for k, v in ema.items()}, out / FILES["transformer_bf16"])
    convert(out / FILES["transformer_bf16"], out / FILES["transformer"], "Q8_0", workers=1, force=True)
    shutil.copyfile(workdir / "ae.safetensors", out / FILES["ae"])

    text = workdir / "text"
    clip = CLIPTextModel.from_pretrained(text / "clip")
    _save(clip.state_dict(), out / FILES["clip"])
    shutil.rmtree(out / FILES["clip_tokenizer"], ignore_errors=True)
    AutoTokenizer.from_pretrained(text / "clip_tokenizer").save_pretrained(out / FILES["clip_tokenizer"])
    t5 = T5EncoderModel.from_pretrained(text / "t5")
    save_t5_gguf(out / FILES["t5"], t5, AutoTokenizer.from_pretrained(text / "t5_tokenizer"), type="Q8_0",
                 context_length=config.t5_max_length)

    manifest = {"files": FILES, "defaults": {"t5_max_length": config.t5_max_length, "shift": False, "true_cfg": 1.0,
                                             "width": demo_world.IMAGE_SIZE, "height": demo_world.IMAGE_SIZE,
                                             **defaults},
                "trained_on": "a {color} {shape} on a {color} background; colors " + ", ".join(demo_world.COLORS)
                              + "; shapes " + ", ".join(demo_world.SHAPES)}
    tmp = out / f".{MANIFEST.name}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST.name)
    for name in sorted(p.name for p in out.iterdir()):
        path = out / name
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{name:32s} {size / 1e6:7.2f} MB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-train"), help="the training work directory")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="where to write (default: the package's engine/demo)")
    parser.add_argument("--steps", type=int, default=20, help="default sampling steps recorded in demo.json")
    parser.add_argument("--guidance", type=float, default=4.0,
                        help="default distilled guidance scale recorded in demo.json (the model learned 1-5; on the "
                             "held-out prompts 3, 4 and 5 draw colors alike and 4 and 5 shapes best)")
    args = parser.parse_args(argv)
    export(args.workdir, args.out, {"steps": args.steps, "guidance": args.guidance})


if __name__ == "__main__":
    main()
