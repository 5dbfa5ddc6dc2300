"""FP8 safetensors checkpoints: float8_e4m3fn weights kept as `QTensor`s of format F8_E4M3.

Layouts handled:
- plain FP8 (Kijai's `flux1-dev-fp8.safetensors`): weights cast to float8_e4m3fn, no scales; value = fp8 value.
- ComfyUI "scaled fp8" (`*_fp8_scaled.safetensors`): `X.weight` float8_e4m3fn plus a float32 per-tensor scalar
  `X.scale_weight`; value = fp8 value * scale_weight (in float32). A marker tensor `scaled_fp8` (under the model's
  prefix, e.g. `model.diffusion_model.scaled_fp8`) flags the file; ComfyUI reads only its dtype (float32 means
  e4m3fn) and its size (2 elements: "full precision matrix multiplication", i.e. do not run the matmul in fp8),
  never its values (comfy/utils.py `convert_old_quants`, which renames `scale_weight` to `weight_scale` and
  `scale_input` to `input_scale`). The marker is dropped here.
- ComfyUI's newer mixed-precision layout (what `convert_old_quants` produces): `X.weight_scale` instead of
  `X.scale_weight`, and a `X.comfy_quant` uint8 JSON tensor {"format": "float8_e4m3fn", ...}; other formats in it
  (nvfp4, int8 ...) are refused.
- `X.scale_input` / `X.input_scale`: the static activation scale ComfyUI uses when it runs the matmul itself in fp8
  (the input is divided by it and cast to fp8). We compute in bf16/fp32 from the decoded weight, so it does not
  apply and is dropped.

Other float8_e4m3fn tensors of fewer than 2 dimensions (biases, norms: none in the files we know) are decoded to
plain bfloat16 tensors (exact: every e4m3fn value is a bfloat16), times their scale if they have one.
float8_e5m2 tensors are refused: no registry format stores them.
"""

from __future__ import annotations

import json
import math

import torch

from engine.errors import ModelFileError
from kernels.qtensor import QTensor

FORMAT = "F8_E4M3"
MARKER = "scaled_fp8"
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's legacy name, then its current one
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
QUANT_CONF_SUFFIX = ".comfy_quant"
SUPPORTED_QUANT_FORMATS = ("float8_e4m3fn",)


def _is_marker(name: str) -> bool:
    return name == MARKER or name.endswith("." + MARKER)


def _scale_of(tensors: dict, layer: str, path) -> tuple[float | None, str | None]:
    for suffix in WEIGHT_SCALE_SUFFIXES:
        key = layer + suffix
        if key in tensors:
            scale = tensors[key]
            if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.numel() != 1:
                shape = list(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
                raise ModelFileError(path, f"{key}: only a single per-tensor scale is supported, got {shape}")
            value = float(scale.detach().reshape(()).to(torch.float32))
            if not math.isfinite(value):
                raise ModelFileError(path, f"{key}: scale {value} is not finite")
            return value, key
    return None, None


def _check_quant_conf(tensors: dict, key: str, path) -> None:
    try:
        conf = json.loads(tensors[key].detach().cpu().contiguous().numpy().tobytes().decode("utf-8"))
        fmt = conf.get("format")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
        raise ModelFileError(path, f"{key}: corrupt ComfyUI quantization config: {e}") from None
    if fmt not in SUPPORTED_QUANT_FORMATS:
        raise ModelFileError(path, f"{key}: ComfyUI quantization format {fmt!r} is unsupported "
                                   f"(only {', '.join(SUPPORTED_QUANT_FORMATS)})")


def apply_scales(tensors: dict, path) -> dict:
    """float8_e4m3fn weights -> F8_E4M3 `QTensor`s carrying their per-tensor scale; scale and marker keys dropped.
    Everything else is kept, in the file's order."""
    if not any(isinstance(t, torch.Tensor) and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
               for t in tensors.values()):
        return tensors
    converted, used = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or _is_marker(name):
            continue
        if t.dtype == torch.float8_e5m2:
            raise ModelFileError(path, f"tensor {name!r} is float8_e5m2, which is unsupported (only float8_e4m3fn)")
        if t.dtype != torch.float8_e4m3fn:
            continue
        scale = None
        if name.endswith(".weight"):
            layer = name[:-len(".weight")]
            scale, scale_key = _scale_of(tensors, layer, path)
            used.add(scale_key)
            if layer + QUANT_CONF_SUFFIX in tensors:
                _check_quant_conf(tensors, layer + QUANT_CONF_SUFFIX, path)
                used.add(layer + QUANT_CONF_SUFFIX)
        if t.dim() >= 2:
            converted[name] = QTensor(t.reshape(-1, t.shape[-1]).view(torch.uint8), FORMAT, tuple(t.shape), scale)
        else:
            values = t.float()
            converted[name] = (values * scale if scale is not None else values).to(torch.bfloat16)
    out = {}
    for name, t in tensors.items():
        if name in converted:
            out[name] = converted[name]
            continue
        if name in used or _is_marker(name):
            continue
        if name.endswith(INPUT_SCALE_SUFFIXES):
            continue  # the activation scale of ComfyUI's fp8 matmul: unused here (see the module docstring)
        if name.endswith(WEIGHT_SCALE_SUFFIXES) or name.endswith(QUANT_CONF_SUFFIX):
            weight_name = name[:name.rfind(".")] + ".weight"
            weight = tensors.get(weight_name)
            what = "no such tensor" if weight is None else getattr(weight, "dtype", type(weight).__name__)
            raise ModelFileError(path, f"{name}: a scale or quantization config for {weight_name}, which is not "
                                       f"float8_e4m3fn ({what})")
        out[name] = t
    return out
