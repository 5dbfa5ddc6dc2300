"""VRAM planner: where each part of a Flux run lives, so that the run fits the GPU.

`plan_memory` takes the transformer (loaded, or built on the meta device for a preset by `flux_for_preset`), the
image size, batch and text length, and a budget (the card's VRAM, or what the device has free now) and returns a
`MemoryPlan`: the transformer resident when it fits, otherwise as many blocks as needed streamed from pinned CPU
memory through two staging slots (`engine.streaming`), the VAE decoded in tiles when the whole decode would not fit.
When nothing fits, one `InsufficientMemoryError` states the minimum VRAM.

Bytes are counted from the model's own tensors (parameters, buffers, quantized weights, runtime LoRA factors: the
resident ones get a line of their own); the transformer is counted after `Flux.offload_modulation_weights` (the
pipeline precomputes every modulation first), activations come from the formulas in `engine.activations`.
Everything loaded (transformer part, staging slots, modulations, VAE weights, kernel scratch) is counted as present
for the whole run; on top of it come the text encoders while encoding, the transformer's activations while
denoising, the VAE's while decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.activations import (flux_forward_bytes, image_tokens, sampler_state_bytes, vae_decode_bytes,
                                vae_tiled_decode_bytes)
from engine.lora.runtime import LoRALinear
from engine.module_tensors import device_nbytes, tensor_nbytes, unique_tensors
from engine.presets import PRESETS, tensor_format
from flux_model import Flux, FluxConfig
from flux_model.autoencoder import AutoEncoderParams, Decoder
from kernels.formats import get_format
from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear

GiB = 1 << 30
# Allowances not derived from shapes. Unmeasured so far: to be replaced by measurements on a GPU.
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context and cuBLAS workspaces, outside torch's allocator (named budgets only)
ALLOCATOR_RESERVE = 0.10  # caching-allocator rounding and fragmentation, as a fraction of the activations
FREE_VRAM_MARGIN = GiB // 4  # left unused of the measured free VRAM, for other processes' small allocations
VAE_TILES = (96, 64, 48, 32, 16)  # latent positions per tile side, tried largest first when a full decode won't fit
PHASES = ("text encoding", "denoising", "decoding")
# Formats loaders keep as plain torch tensors; every other one (FP8 included) stays a QTensor inside a QuantLinear
DENSE_FORMATS = ("F32", "F16", "BF16")


class InsufficientMemoryError(ValueError):
    """Even with every block streamed and the smallest VAE tiles the run does not fit; `minimum` is the budget (bytes,
    same meaning as the one given) it would need."""

    def __init__(self, message: str, minimum: int, budget: int):
        super().__init__(message)
        self.minimum = minimum
        self.budget = budget


@dataclass(frozen=True)
class Component:
    name: str
    where: str  # "cuda:0", or "cpu (pinned)" for streamed blocks
    nbytes: int
    phase: str | None = None  # only present during this phase (one of PHASES); None: the whole run

    @property
    def on_device(self) -> bool:
        return not self.where.startswith("cpu")


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    budget: int  # VRAM the plan may use, bytes
    width: int
    height: int
    batch_size: int
    txt_len: int
    components: tuple[Component, ...]
    streamed_double: tuple[int, ...]  # indices of double_blocks kept in pinned CPU memory and streamed
    streamed_single: tuple[int, ...]  # indices of single_blocks likewise
    vae_tile: int | None  # latent positions per tile side for the VAE decode; None: decode whole
    precompute_on_device: bool  # the modulation weights fit on the device beside the rest for precompute

    @property
    def streams(self) -> bool:
        return bool(self.streamed_double or self.streamed_single)

    def phase_peak(self, phase: str) -> int:
        return sum(c.nbytes for c in self.components if c.on_device and c.phase in (None, phase))

    @property
    def peak(self) -> int:
        """Predicted peak VRAM of the run, bytes."""
        return max(self.phase_peak(p) for p in PHASES)

    @property
    def text_encoder_budget(self) -> int:
        """VRAM left for the text encoders while everything else is loaded."""
        return self.budget - self.phase_peak("text encoding") + self._bytes_of("text encoders")

    def _bytes_of(self, name: str) -> int:
        return sum(c.nbytes for c in self.components if c.name == name)

    def describe(self) -> str:
        """The plan as a small aligned table (what `--plan` prints)."""
        rows = [("component", "where", "VRAM", "CPU RAM", "when")]
        for c in self.components:
            size = f"{c.nbytes / GiB:.2f} GiB"
            rows.append((c.name, c.where, size if c.on_device else "", "" if c.on_device else size,
                         c.phase or "always"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        align = ("<", "<", ">", ">", "<")
        lines = [f"Flux {self.width}x{self.height}, batch {self.batch_size}, {self.txt_len} text tokens on "
                 f"{self.device}: budget {self.budget / GiB:.2f} GiB"]
        lines += ["  ".join(f"{v:{a}{w}}" for v, a, w in zip(r, align, widths)).rstrip() for r in rows]
        peaks = ", ".join(f"{p} {self.phase_peak(p) / GiB:.2f}" for p in PHASES)
        lines.append(f"predicted peak: {self.peak / GiB:.2f} GiB of {self.budget / GiB:.2f} GiB ({peaks})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ transformer bytes


@dataclass(frozen=True)
class TransformerBytes:
    """Bytes of a Flux's tensors on a GPU (quantized weights in the kernels' layout), after modulation offload: per
    block, the rest, and the offloaded vec modules."""

    double: tuple[int, ...]
    single: tuple[int, ...]
    other: int  # img_in, txt_in, final layer: always resident
    modulation_weights: int  # embedders and adaLN Linears: only needed to precompute modulations
    largest_quantized_linear: int  # elements of the largest QuantLinear weight (its dequantize scratch)
    # runtime LoRA factors (`engine.lora.LoRALinear`), already counted above: per block, and outside the blocks
    lora_double: tuple[int, ...] = ()
    lora_single: tuple[int, ...] = ()
    lora_other: int = 0

    @property
    def total(self) -> int:
        return sum(self.double) + sum(self.single) + self.other


def transformer_bytes(model: Flux) -> TransformerBytes:
    vec = nn.ModuleList(model.vec_modules())
    vec_ids = {id(t) for t in unique_tensors(vec)}

    def without_vec(module: nn.Module) -> int:
        return device_nbytes(module, skip=vec_ids)

    blocks = [*model.double_blocks, *model.single_blocks]
    block_ids = {id(t) for b in blocks for t in unique_tensors(b)}
    other = device_nbytes(model, skip=vec_ids | block_ids)
    quantized = [m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)]
    vec_loras = {id(m) for m in vec.modules() if isinstance(m, LoRALinear)}

    def loras(module: nn.Module) -> int:
        return sum(m.lora_nbytes for m in module.modules() if isinstance(m, LoRALinear) and id(m) not in vec_loras)

    lora_double, lora_single = tuple(map(loras, model.double_blocks)), tuple(map(loras, model.single_blocks))
    return TransformerBytes(double=tuple(without_vec(b) for b in model.double_blocks),
                            single=tuple(without_vec(b) for b in model.single_blocks), other=other,
                            modulation_weights=device_nbytes(vec), largest_quantized_linear=max(quantized, default=0),
                            lora_double=lora_double, lora_single=lora_single,
                            lora_other=loras(model) - sum(lora_double) - sum(lora_single))


def flux_for_preset(config: FluxConfig, preset: str, dtype: torch.dtype = torch.bfloat16) -> Flux:
    """A Flux on the meta device holding what loading a GGUF of `preset` would hold: quantized weights as
    QuantLinears of that format, every other tensor dense in `dtype` (the loader casts F16/F32 leftovers to it)."""
    return flux_with_formats(config, lambda name, shape: tensor_format(name, shape, PRESETS[preset]), dtype)


def flux_with_formats(config: FluxConfig, format_of: Callable[[str, tuple[int, ...]], str],
                      dtype: torch.dtype = torch.bfloat16) -> Flux:
    """A Flux on the meta device whose Linear weights are stored as `format_of(weight name, shape)` says
    (QuantLinears for quantized formats); every other tensor dense in `dtype`."""
    with torch.device("meta"):
        model = Flux(config).to(dtype)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        shape = tuple(module.weight.shape)
        fmt = get_format(format_of(f"{name}.weight", shape))
        if fmt.name not in DENSE_FORMATS:
            raw = torch.empty((shape[0], fmt.row_bytes(shape[1])), dtype=torch.uint8, device="meta")
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, QuantLinear(QTensor(raw, fmt.name, shape), module.bias))
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------- planning


def stream_order(depth_double: int, depth_single: int) -> list[tuple[str, int]]:
    """The order in which blocks leave the GPU: single blocks first (twice the compute per weight byte of a double
    block, whose img and txt weights each see only their own tokens, so their copies hide better), then double
    blocks; within each kind spread evenly, so resident blocks run between streamed ones while the next copies."""
    def spread(n: int) -> list[int]:
        order, seen = [], set()
        step = n
        while len(order) < n:
            for i in range(0, n, step):
                if i not in seen:
                    seen.add(i)
                    order.append(i)
            step = max(1, step // 2)
        return order

    return [("single", i) for i in spread(depth_single)] + [("double", i) for i in spread(depth_double)]


def available_vram(device) -> int:
    """What this process can use on `device` now: free VRAM plus what torch's allocator holds, less a margin."""
    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - FREE_VRAM_MARGIN


def plan_memory(transformer: Flux, *, width: int, height: int, batch_size: int = 1, txt_len: int = 512,
                num_steps: int = 28, autoencoder: AutoEncoderParams | nn.Module | None = None,
                vae_dtype: torch.dtype | None = None, text_encoder_bytes: int = 0, budget: int | None = None,
                device="cuda", max_streamed_blocks: int | None = None) -> MemoryPlan:
    """Choose where everything lives for one run of `batch_size` width x height images.

    transformer: a loaded Flux, or `flux_for_preset(...)` (meta); its dense dtype is the compute dtype.
    autoencoder: the VAE (module or AutoEncoderParams; default FLUX's VAE in the compute dtype, or `vae_dtype`).
    text_encoder_bytes: VRAM the text encoders need while encoding (their own streaming plan), 0 if not counted.
    budget: the device's whole VRAM in bytes (what `--vram GB` names; the CUDA context is counted inside it), or None
    for what `device` has available now (`available_vram`: the context exists already).
    max_streamed_blocks: at most this many blocks may be streamed (0: keep the transformer resident or fail).
    The first plan that fits, in order of fewer streamed blocks, then larger VAE tiles (whole decode first).
    Raises InsufficientMemoryError when even the most streaming allowed with the smallest VAE tiles does not fit."""
    where = str(device)
    if budget is None:
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device to measure free VRAM on: give a budget (--vram GB)")
        budget, context = available_vram(device), 0
    else:
        context = CUDA_CONTEXT_BYTES
    dtype = transformer.dtype
    config = transformer.params
    sizes = transformer_bytes(transformer)
    if isinstance(autoencoder, nn.Module):
        ae_params, ae_bytes = autoencoder.params, tensor_nbytes(autoencoder.decoder)
        vae_dtype = next(autoencoder.decoder.parameters()).dtype
    else:
        ae_params = autoencoder or AutoEncoderParams()
        vae_dtype = vae_dtype or dtype
        with torch.device("meta"):
            decoder = Decoder(ch=ae_params.ch, out_ch=ae_params.out_ch, ch_mult=list(ae_params.ch_mult),
                              num_res_blocks=ae_params.num_res_blocks, in_channels=ae_params.in_channels,
                              resolution=ae_params.resolution, z_channels=ae_params.z_channels,
                              groups=ae_params.norm_groups)
        ae_bytes = sum(p.numel() for p in decoder.parameters()) * vae_dtype.itemsize

    f = 2 ** (len(ae_params.ch_mult) - 1)
    latent_h, latent_w = 2 * image_tokens(16, height), 2 * image_tokens(width, 16)
    activations = (flux_forward_bytes(config, width, height, batch_size, txt_len, dtype)
                   + sampler_state_bytes(config, width, height, batch_size, txt_len, dtype))
    modulations = num_steps * batch_size * config.hidden_size * dtype.itemsize * (
        12 * config.depth + 3 * config.depth_single_blocks + 2)
    scratch = sizes.largest_quantized_linear * dtype.itemsize  # quant_linear's dequantize-then-matmul buffer

    def decode_bytes(tile):
        if tile is None:
            return vae_decode_bytes(ae_params, latent_h, latent_w, batch_size, vae_dtype)
        return vae_tiled_decode_bytes(ae_params, latent_h, latent_w, batch_size, vae_dtype, tile)

    tiles = [None] + [t for t in VAE_TILES if t < max(latent_h, latent_w)]
    order = stream_order(config.depth, config.depth_single_blocks)

    def build(n_streamed: int, tile) -> MemoryPlan:
        streamed = order[:n_streamed]
        block_bytes = {("double", i): b for i, b in enumerate(sizes.double)}
        block_bytes.update({("single", i): b for i, b in enumerate(sizes.single)})
        streamed_bytes = sum(block_bytes[b] for b in streamed)
        slots = min(2, n_streamed) * max((block_bytes[b] for b in streamed), default=0)
        decode = decode_bytes(tile)
        reserve = int(ALLOCATOR_RESERVE * max(activations, decode, text_encoder_bytes))
        n_double = sum(kind == "double" for kind, _ in streamed)
        lora_bytes = {("double", i): b for i, b in enumerate(sizes.lora_double)}
        lora_bytes.update({("single", i): b for i, b in enumerate(sizes.lora_single)})
        resident_loras = sizes.lora_other + sum(b for block, b in lora_bytes.items() if block not in streamed)
        parts = [Component("transformer, resident", where, sizes.total - streamed_bytes - resident_loras),
                 Component("LoRA factors, resident", where, resident_loras),
                 Component(f"transformer, {n_streamed - n_double} single + {n_double} double blocks streamed",
                           "cpu (pinned)", streamed_bytes),
                 Component("staging slots (2 blocks)", where, slots),
                 Component(f"modulations ({num_steps} steps)", where, modulations),
                 Component("kernel scratch", where, scratch),
                 Component("VAE decoder weights", where, ae_bytes),
                 Component("CUDA context", where, context),
                 Component("text encoders", where, text_encoder_bytes, "text encoding"),
                 Component("transformer activations", where, activations, "denoising"),
                 Component("VAE decode" + ("" if tile is None else f", {tile * f}px tiles"), where, decode,
                           "decoding"),
                 Component("allocator reserve", where, reserve)]
        loaded = sum(c.nbytes for c in parts if c.on_device and c.phase is None)
        return MemoryPlan(device=where, budget=budget, width=width, height=height, batch_size=batch_size,
                          txt_len=txt_len, components=tuple(c for c in parts if c.nbytes),
                          streamed_double=tuple(sorted(i for kind, i in streamed if kind == "double")),
                          streamed_single=tuple(sorted(i for kind, i in streamed if kind == "single")),
                          vae_tile=tile, precompute_on_device=loaded + sizes.modulation_weights <= budget)

    smallest = None
    most = len(order) if max_streamed_blocks is None else min(max_streamed_blocks, len(order))
    for n_streamed in range(most + 1):
        for tile in tiles:
            plan = build(n_streamed, tile)
            if plan.peak <= budget:
                return plan
            smallest = plan if smallest is None or plan.peak < smallest.peak else smallest
    what = "VRAM" if context else "free VRAM"
    tiling = "whole" if smallest.vae_tile is None else f"in {smallest.vae_tile * f}px tiles"
    streaming = ("every transformer block streamed from CPU memory" if most == len(order)
                 else f"{most} transformer blocks streamed from CPU memory")
    raise InsufficientMemoryError(
        f"not enough VRAM: Flux at {width}x{height}, batch {batch_size} needs at least "
        f"{math.ceil(smallest.peak / GiB * 10) / 10:.1f} GiB of {what} with {streaming} and the VAE decoded "
        f"{tiling}; the budget is {budget / GiB:.1f} GiB",
        smallest.peak, budget)
