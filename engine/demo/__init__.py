"""The small Flux that ships with the project, so `python -m engine.generate "a red circle on a blue background"` runs
on a fresh machine with no download.

Trained by `python -m bench.train_demo` on a synthetic world of colored shapes ("a {color} {shape} on a {color}
background", 128x128 pixels; guidance-distilled like FLUX.1-dev) and written by `python -m bench.export_demo` in the
layouts users have: the transformer as a city96-layout Q8_0 GGUF (and the BF16 safetensors it was converted from), BFL's `ae.safetensors`, CLIP as a
ComfyUI single file with its tokenizer folder, T5 as a `t5encoder` GGUF with its tokenizer inside. `demo.json` names
the files and the sampling settings the model was trained for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.errors import ModelFileError

DEMO_DIR = Path(__file__).parent
MANIFEST = DEMO_DIR / "demo.json"


def manifest() -> dict:
    if not MANIFEST.is_file():
        raise ModelFileError(MANIFEST, "the demo model is not installed: pass --model, --ae, --clip and --t5")
    return json.loads(MANIFEST.read_text())


def files(transformer: str = "transformer") -> dict[str, Path]:
    """Paths of the demo's files; `transformer="transformer_bf16"` names the BF16 original instead of the GGUF."""
    entries = manifest()["files"]
    return {"transformer": DEMO_DIR / entries[transformer], "ae": DEMO_DIR / entries["ae"],
            "clip": DEMO_DIR / entries["clip"], "clip_tokenizer": DEMO_DIR / entries["clip_tokenizer"],
            "t5": DEMO_DIR / entries["t5"]}


def load_pipeline(device=None, dtype: torch.dtype = torch.float32, vram: float | None = None,
                  prompt_cache: bool = True, transformer: str = "transformer"):
    from engine.pipeline import FluxPipeline, SamplingDefaults

    paths = files(transformer)
    defaults = SamplingDefaults(**manifest()["defaults"])
    return FluxPipeline.from_files(paths["transformer"], paths["ae"], paths["clip"], paths["t5"], device=device,
                                   dtype=dtype, vram=vram, clip_tokenizer=paths["clip_tokenizer"], defaults=defaults,
                                   prompt_cache=prompt_cache)
