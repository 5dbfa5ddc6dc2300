"""`read_lora(path, model)`: a LoRA safetensors file, in any layout Flux LoRAs ship in, as updates of the model's own
Linears (BFL names, fused q/k/v).

Layouts, told apart by their keys:
- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (`attn.to_q`, `add_k_proj`,
  `to_out.0`, `ff.net.0.proj`, `norm1.linear`, single blocks' `proj_mlp`, `proj_out`, ...), scaled by
  `<module>.alpha` / rank, else by PEFT's `lora_alpha / r` from the file's `lora_adapter_metadata` (its alpha_pattern
  and use_rslora included), else 1, as diffusers' `load_lora_weights` scales them;
- kohya / sd-scripts, as ComfyUI and Forge load them: `lora_unet_<BFL module, dots as underscores>.lora_down.weight`,
  `.lora_up.weight`, `.alpha` (scale alpha / rank, else 1);
- XLabs: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1: image stream, 2: text stream) and
  `single_blocks.N.processor.{qkv,proj}_lora.*` (the q/k/v rows of linear1, and linear2); scale 1, as XLabs applies
  them;
- BFL names with either kind of factor names (`double_blocks.0.img_attn.qkv.lora_A.weight`), optionally under
  `diffusion_model.` or `transformer.`.

A diffusers q, k or v (or single-block MLP input) update lands on its rows of the fused weight, and diffusers'
`norm_out.linear` keeps its halves in (scale, shift) order where BFL's `final_layer.adaLN_modulation.1` has (shift,
scale), so that update's rows are swapped: the names and the swap are `engine.checkpoints.diffusers`' own. Text-encoder
parts (`lora_te*`, `text_encoder*`) are skipped with a warning: the prompt encoders stay as loaded. Keys that are not
understood and factors whose shapes do not fit the model are all named in one ModelFileError.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from engine.checkpoints import PICKLE_SUFFIXES
from engine.checkpoints.diffusers import SWAPPED, bfl_name, swap_halves
from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError
from engine.lora.runtime import linear_modules
from engine.lora.updates import LoRA, LoRAUpdate

log = logging.getLogger("engine.lora")

FACTORS = (  # key suffix -> factor; `.down/.up.weight` only under an XLabs processor
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha"),
)
KOHYA_PREFIX = "lora_unet_"
DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.")
XLABS = re.compile(r"(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)")
PEFT_METADATA = "lora_adapter_metadata"
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft's LoraConfig defaults, which a metadata entry may leave out


class _Targets:
    """Where a key's module part lands: (BFL module, first row, rows, layout, swap halves), or None when it is not
    understood."""

    def __init__(self, linears: dict[str, nn.Module], hidden: int):
        self.linears, self.hidden = linears, hidden
        self.kohya = {name.replace(".", "_"): name for name in linears}

    def _whole(self, module: str | None, layout: str, rows: int | None = None):
        if module not in self.linears:
            return None
        return module, 0, rows or self.linears[module].out_features, layout, False

    def __call__(self, key: str):
        if key.startswith(KOHYA_PREFIX):
            return self._whole(self.kohya.get(key[len(KOHYA_PREFIX):]), "kohya")
        if m := XLABS.fullmatch(key):
            kind, index, what, stream = m.groups()
            if kind == "double_blocks" and stream:
                return self._whole(f"double_blocks.{index}.{'img' if stream == '1' else 'txt'}_attn.{what}", "xlabs")
            if kind == "single_blocks" and not stream:
                if what == "qkv":
                    return self._whole(f"single_blocks.{index}.linear1", "xlabs", rows=3 * self.hidden)
                return self._whole(f"single_blocks.{index}.linear2", "xlabs")
            return None
        name = next((key[len(p):] for p in DOTTED_PREFIXES if key.startswith(p)), key)
        if name in self.linears:
            return self._whole(name, "bfl")
        found = bfl_name(f"{name}.weight")
        module = None if found is None else found[0].removesuffix(".weight")
        if module not in self.linears:
            return None
        _, part, parts = found
        out = self.linears[module].out_features
        start = 0 if parts == 1 else part * self.hidden
        rows = out - start if part == parts - 1 else self.hidden  # single blocks' MLP input: the last, longer part
        return module, start, rows, "diffusers", module == SWAPPED


class _PeftScaling:
    """alpha / r as PEFT computes it from `lora_adapter_metadata` (the transformer's entries): lora_alpha, or the
    alpha_pattern entry matching the module name, over r (over sqrt(r) with use_rslora)."""

    def __init__(self, metadata: dict, path):
        self.alpha, self.patterns, self.rslora = None, [], False
        raw = metadata.get(PEFT_METADATA)
        if not raw:
            return
        try:
            data = json.loads(raw)
            config = {k.removeprefix("transformer."): v for k, v in data.items() if k.startswith("transformer.")}
            if not config:
                return
            config = {**PEFT_DEFAULTS, **config}
            self.alpha = float(config["lora_alpha"])
            self.patterns = [(re.compile(rf"(.*\.)?({pattern})$"), float(value))  # peft's get_pattern_key
                             for pattern, value in (config.get("alpha_pattern") or {}).items()]
            self.rslora = bool(config.get("use_rslora"))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError, re.error) as e:
            raise ModelFileError(path, f"malformed {PEFT_METADATA} metadata: {e}") from None

    def scale(self, module_key: str, rank: int) -> float:
        if self.alpha is None:
            return 1.0
        module = module_key.removeprefix("transformer.")
        alpha = next((value for pattern, value in self.patterns if pattern.match(module)), self.alpha)
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def _few(names: list[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_factors(key: str, factors: dict, linear: nn.Module, rows: int) -> str | None:
    """What is wrong with a module's factors, or None."""
    if "down" not in factors or "up" not in factors:
        return f"{key}: {'up' if 'down' in factors else 'down'}-projection missing"
    down, up = factors["down"], factors["up"]
    if not (down.is_floating_point() and up.is_floating_point()) or down.dim() != 2 or up.dim() != 2 or not len(down):
        return (f"{key}: factors must be 2-D float tensors of rank 1 or more, got {down.dtype}{list(down.shape)} and "
                f"{up.dtype}{list(up.shape)}")
    if down.shape[1] != linear.in_features or up.shape != (rows, down.shape[0]):
        return (f"{key}: factors {list(down.shape)} and {list(up.shape)} do not fit a ({rows} x {linear.in_features}) "
                f"update of the model's ({linear.out_features} x {linear.in_features}) Linear")
    alpha = factors.get("alpha")
    if alpha is not None and (alpha.numel() != 1 or not torch.isfinite(alpha.float()).all()):
        return f"{key}: alpha must be one finite number, got {alpha.dtype}{list(alpha.shape)}"
    return None


def read_lora(path, model: nn.Module) -> LoRA:
    """The LoRA in safetensors file `path` as updates of `model`'s Linears (a Flux: its `hidden_size` places q/k/v
    slices). ModelFileError naming every key not understood or not fitting the model."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such file" if not path.exists() else "not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(path, "pickle-based LoRA file: loading one can run arbitrary code, so it is refused; "
                                   "use a .safetensors file")
    tensors, metadata = read_safetensors(path)
    linears = linear_modules(model)
    targets = _Targets(linears, model.hidden_size)
    peft = _PeftScaling(metadata, path)

    factors: dict[str, dict[str, torch.Tensor]] = {}  # module part of the keys -> "down", "up", "alpha"
    keys: dict[str, list[str]] = {}
    unknown, skipped = [], []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            skipped.append(key)
            continue
        suffix, factor = next(((s, f) for s, f in FACTORS if key.endswith(s)), (None, None))
        module_key = key[:-len(suffix)] if suffix else None
        if module_key is None or (suffix in (".down.weight", ".up.weight") and not XLABS.fullmatch(module_key)):
            unknown.append(key)
            continue
        factors.setdefault(module_key, {})[factor] = tensor
        keys.setdefault(module_key, []).append(key)

    updates, problems, layouts = [], [], set()
    for module_key, found in factors.items():
        target = targets(module_key)
        if target is None:
            unknown.extend(keys[module_key])
            continue
        module, start, rows, layout, swap = target
        problem = _check_factors(module_key, found, linears[module], rows)
        if problem:
            problems.append(problem)
            continue
        down, up = found["down"], found["up"]
        if "alpha" in found:
            scale = found["alpha"].float().item() / down.shape[0]
        elif f"{module_key}.lora_A.weight" in tensors:
            scale = peft.scale(module_key, down.shape[0])
        else:
            scale = 1.0
        if swap:
            up = swap_halves(up, module_key, path)
        updates.append(LoRAUpdate(module, down, up, scale, start))
        layouts.add(layout)

    if unknown or problems:
        parts = [f"{len(unknown)} key(s) not understood as a Flux transformer LoRA: {_few(unknown)}"] if unknown else []
        parts += [f"{len(problems)} malformed: {'; '.join(problems[:3])}"] if problems else []
        raise ModelFileError(path, "; ".join(parts))
    if not updates:
        what = f"only text-encoder parts ({len(skipped)} keys)" if skipped else "no tensors"
        raise ModelFileError(path, f"no LoRA for the Flux transformer: the file holds {what}")
    if skipped:
        log.warning("%s: %d text-encoder LoRA keys skipped (the text encoders are not patched)", path, len(skipped))
    return LoRA(name=path.stem, path=str(path), format="+".join(sorted(layouts)), updates=tuple(updates))
