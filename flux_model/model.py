"""The Flux.1 transformer (black-forest-labs/flux `model.py` + `modules/layers.py` + `math.py`), with BFL's parameter
names so a BFL checkpoint loads with no renaming, and two additions for quantized inference on small GPUs:

- any `nn.Linear` may be swapped for a `kernels.QuantLinear` whose weight stays quantized (`Flux.from_state_dict`);
- every adaLN modulation depends only on (timestep, guidance, pooled CLIP vector), so all of them can be computed for
  every denoising step up front (`precompute_modulations`) and their weights - 27% of Flux-dev - dropped from the GPU
  (`offload_modulation_weights`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear


@dataclass
class FluxConfig:
    """BFL's `FluxParams`."""

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    @classmethod
    def dev(cls) -> FluxConfig:
        return cls(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                   mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                   theta=10_000, qkv_bias=True, guidance_embed=True)

    @classmethod
    def schnell(cls) -> FluxConfig:
        config = cls.dev()
        config.guidance_embed = False  # schnell is timestep-distilled, not guidance-distilled: no guidance_in
        return config

    @classmethod
    def from_state_dict(cls, state_dict) -> FluxConfig:
        """The config a BFL-named state dict (tensors or QTensors; only shapes are read) implies."""
        return cls(**infer_flux_config(state_dict))


# ------------------------------------------------------------------------------------------------ config inference
# Flux files carry no hyperparameters: they are read off BFL's tensor names and shapes.


def _shape(state_dict, name):
    try:
        return tuple(state_dict[name].shape)
    except KeyError:
        raise ValueError(f"not a Flux transformer: tensor {name!r} is missing") from None


def _count_blocks(state_dict, prefix):
    indices = {int(m.group(1)) for name in state_dict if (m := re.match(rf"{prefix}\.(\d+)\.", name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{prefix} are not numbered 0..{len(indices) - 1}: {sorted(indices)[:10]}...")
    return len(indices)


def infer_flux_config(state_dict) -> dict:
    """Keyword arguments for the reference Flux parameters (`flux_model.FluxConfig`): in_channels, out_channels,
    vec_in_dim, context_in_dim, hidden_size, mlp_ratio, num_heads, depth, depth_single_blocks, axes_dim, theta,
    qkv_bias, guidance_embed. Works on tensors and `QTensor`s alike (only shapes are read). ValueError when the
    names and shapes are not those of a Flux transformer."""
    hidden_size, in_channels = _shape(state_dict, "img_in.weight")
    depth = _count_blocks(state_dict, "double_blocks")
    depth_single = _count_blocks(state_dict, "single_blocks")
    if depth == 0:
        raise ValueError("not a Flux transformer: no double_blocks.*")
    (head_dim,) = _shape(state_dict, "double_blocks.0.img_attn.norm.query_norm.scale")
    if hidden_size % head_dim:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of the head size {head_dim}")
    mlp_hidden, _ = _shape(state_dict, "double_blocks.0.img_mlp.0.weight")
    axes_dim = [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]  # (16, 56, 56) for Flux's 128
    if sum(axes_dim) != head_dim:
        raise ValueError(f"head size {head_dim} has no Flux RoPE axes split")
    return dict(
        in_channels=in_channels,
        out_channels=_shape(state_dict, "final_layer.linear.weight")[0],
        vec_in_dim=_shape(state_dict, "vector_in.in_layer.weight")[1],
        context_in_dim=_shape(state_dict, "txt_in.weight")[1],
        hidden_size=hidden_size,
        mlp_ratio=mlp_hidden / hidden_size,
        num_heads=hidden_size // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=axes_dim,
        theta=10_000,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in state_dict,
        guidance_embed="guidance_in.in_layer.weight" in state_dict,
    )


# ------------------------------------------------------------------------------------------------ functions


def timestep_embedding(t: Tensor, dim: int, max_period=10_000, time_factor: float = 1000.0) -> Tensor:
    """BFL's sinusoidal embedding (cos half first). Flux was trained on t in [0, 1] scaled by 1000 (and guidance
    likewise); the multiplication happens in t's own dtype, as in BFL, so a bf16 t rounds the same way."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """(..., n) positions -> (..., n, dim/2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]], in float32.
    Positions are taken as float32 (BFL uses the ids' dtype; its ids are float32): bf16 ids would lose exact
    integer positions above 256."""
    pos = pos.float()
    scale = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = pos[..., None] * omega  # (..., n, dim/2)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2)


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of q and k by their position's angles (in float32)."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """(B, H, L, D) q, k, v -> (B, L, H*D); RoPE on q and k, full (unmasked) attention."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> q, k, v each (B, H, L, D): BFL's `rearrange("B L (K H D) -> K B H L D")`."""
    B, L, _ = qkv.shape
    q, k, v = qkv.reshape(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


# ------------------------------------------------------------------------------------------------ modules


class EmbedND(nn.Module):
    """3-axis RoPE: ids (B, L, 3) -> (B, 1, L, head_dim/2, 2, 2); axis i uses axes_dim[i] channels of each head."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # statistics in float32 (bf16 sums of squares over 128 channels lose too much), scale in x's dtype
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds qkv / norm / proj under BFL's names; the blocks call the pieces directly (joint attention)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """adaLN: Linear(SiLU(vec)) -> (shift, scale, gate) x (2 if double else 1), each (B, 1, dim)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor | None, precomputed: Tensor | None = None):
        out = self.lin(F.silu(vec)) if precomputed is None else precomputed
        out = out[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    # indices 0 and 2 are the parameter names in BFL checkpoints (img_mlp.0, img_mlp.2)
    return nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden_dim, hidden_size, bias=True))


class DoubleStreamBlock(nn.Module):
    """Image and text tokens keep separate weights but attend jointly (MMDiT)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def _qkv(self, x: Tensor, norm: nn.LayerNorm, attn: SelfAttention, mod: ModulationOut):
        x = (1 + mod.scale) * norm(x) + mod.shift
        q, k, v = split_qkv(attn.qkv(x), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor | None, pe: Tensor,
                mods: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec, None if mods is None else mods[0])
        txt_mod1, txt_mod2 = self.txt_mod(vec, None if mods is None else mods[1])

        img_q, img_k, img_v = self._qkv(img, self.img_norm1, self.img_attn, img_mod1)
        txt_q, txt_k, txt_v = self._qkv(txt, self.txt_norm1, self.txt_attn, txt_mod1)

        # one attention over [txt, img] tokens (txt first: the RoPE table is built in that order)
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP (ViT-22B style): linear1 gives qkv and the MLP input, linear2 takes both back."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor | None, pe: Tensor, mod: Tensor | None = None) -> Tensor:
        mod, _ = self.modulation(vec, mod)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + mod.gate * output


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor | None, precomputed: Tensor | None = None) -> Tensor:
        mod = self.adaLN_modulation(vec) if precomputed is None else precomputed
        shift, scale = mod.chunk(2, dim=1)  # shift first here (diffusers stores this Linear scale first)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


# ------------------------------------------------------------------------------------------------ modulations


@dataclass
class Modulations:
    """Every adaLN modulation output for S denoising steps: raw Linear outputs, each (S, B, k * hidden)."""

    double_img: list[Tensor]  # per double block, k = 6
    double_txt: list[Tensor]  # per double block, k = 6
    single: list[Tensor]  # per single block, k = 3
    final: Tensor  # k = 2

    @property
    def num_steps(self) -> int:
        return self.final.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        return [*self.double_img, *self.double_txt, *self.single, self.final]

    def to(self, device) -> Modulations:
        return Modulations([t.to(device) for t in self.double_img], [t.to(device) for t in self.double_txt],
                           [t.to(device) for t in self.single], self.final.to(device))


def _module_device(module: nn.Module) -> torch.device:
    return next(chain(module.parameters(), module.buffers())).device  # a QuantLinear's bytes are a buffer


# ------------------------------------------------------------------------------------------------ the model


class Flux(nn.Module):
    """Transformer model for flow matching on sequences (BFL's `Flux`)."""

    def __init__(self, params: FluxConfig):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"Hidden size {params.hidden_size} must be divisible by num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"Got {params.axes_dim} but expected positional dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(256, self.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, qkv_bias=params.qkv_bias)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)
        self.modulations_offloaded = False

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: that of the dense parameters (norm scales and biases are never quantized)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return _module_device(self.final_layer.linear)

    # ---------------------------------------------------------------------------------------------- vec

    def vec_modules(self) -> list[nn.Module]:
        """The modules whose only input is (timestep, guidance, pooled text vector): the embedders and every adaLN
        Linear. Flux-dev: 3.23B of 11.90B parameters, almost all in the modulation Linears."""
        modules = [self.time_in, self.vector_in, self.guidance_in]
        for block in self.double_blocks:
            modules += [block.img_mod, block.txt_mod]
        modules += [block.modulation for block in self.single_blocks]
        return modules + [self.final_layer.adaLN_modulation]

    def _vec(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """vec = time_in(t) + guidance_in(g) + vector_in(y), (B, hidden): the only input of every modulation."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    @torch.no_grad()
    def precompute_modulations(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None,
                               device=None) -> Modulations:
        """All adaLN outputs for the S timesteps of a sampling run, one batched Linear per modulation (M = S*B
        rows instead of S launches of M = B). Runs where the modulation weights are (e.g. CPU after
        `offload_modulation_weights("cpu")`); the result goes to `device` (default: the model's device).
        timesteps: (S,), y: (B, vec_in_dim), guidance: (B,) or None."""
        if self.modulations_offloaded and _module_device(self.time_in).type == "meta":
            raise ValueError("modulation weights were offloaded to 'meta'; precompute before offloading")
        if timesteps.dim() != 1 or y.dim() != 2:
            raise ValueError(f"timesteps must be (S,) and y (B, vec_in_dim); got {tuple(timesteps.shape)}, "
                             f"{tuple(y.shape)}")
        device = self.device if device is None else torch.device(device)
        here = _module_device(self.time_in)
        S, B = timesteps.shape[0], y.shape[0]
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps.to(here), 256).to(dtype))[:, None, :]  # (S, 1, H)
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(here), 256).to(dtype))[None]  # (1, B, H)
        vec = vec + self.vector_in(y.to(here, dtype))[None]
        silu_vec = F.silu(vec.reshape(S * B, -1))  # shared by every modulation Linear

        def run(lin: nn.Module) -> Tensor:
            return lin(silu_vec.to(_module_device(lin))).reshape(S, B, -1).to(device)

        return Modulations(
            double_img=[run(block.img_mod.lin) for block in self.double_blocks],
            double_txt=[run(block.txt_mod.lin) for block in self.double_blocks],
            single=[run(block.modulation.lin) for block in self.single_blocks],
            final=run(self.final_layer.adaLN_modulation[1]),
        )

    def offload_modulation_weights(self, device="meta") -> int:
        """Move the embedders and adaLN Linears (only needed by `precompute_modulations`) to `device`: "cpu" keeps
        them for the next prompt, "meta" frees them. Returns the bytes moved off the model's device."""
        moved = 0
        for module in self.vec_modules():
            moved += sum(t.nbytes for t in chain(module.parameters(), module.buffers()))
            module.to(device)
        self.modulations_offloaded = True
        return moved

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor | None = None,
                y: Tensor | None = None, guidance: Tensor | None = None, *, modulations: Modulations | None = None,
                step: int | None = None) -> Tensor:
        """img (B, L_img, in_channels) packed 2x2 latent patches, txt (B, L_txt, context_in_dim) T5 states, ids
        (B, L, 3) positions, timesteps (B,) in [0, 1], y (B, vec_in_dim) pooled CLIP, guidance (B,) (dev only).
        With `modulations` (from `precompute_modulations`), step `step`'s precomputed adaLN outputs are used and
        timesteps / y / guidance are ignored. Returns (B, L_img, out_channels) velocity."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        dtype = self.dtype
        if modulations is None:
            if self.modulations_offloaded:
                raise ValueError("modulation weights were offloaded: pass modulations=precompute_modulations(...) "
                                 "and step=i")
            if timesteps is None or y is None:
                raise ValueError("timesteps and y are required without precomputed modulations")
            vec = self._vec(timesteps, y, guidance)
            mods = None
        else:
            if step is None or not -modulations.num_steps <= step < modulations.num_steps:
                raise ValueError(f"step must index the {modulations.num_steps} precomputed steps, got {step}")
            vec = None
            mods = modulations

        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for i, block in enumerate(self.double_blocks):
            block_mods = None if mods is None else (mods.double_img[i][step], mods.double_txt[i][step])
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, mods=block_mods)

        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            img = block(img, vec=vec, pe=pe, mod=None if mods is None else mods.single[i][step])
        img = img[:, txt.shape[1]:, ...]

        return self.final_layer(img, vec, None if mods is None else mods.final[step])

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor | QTensor], device="cpu",
                        dtype: torch.dtype = torch.bfloat16, config: FluxConfig | None = None) -> Flux:
        """A model from a BFL-named state dict (`engine.load_flux` reads one from a file); ValueError when the
        names or shapes do not fit.

        Built on the meta device, then filled: dense tensors are cast to `dtype` on `device` (no copy when they
        already match); a QTensor weight turns its nn.Linear into a QuantLinear holding the QTensor's bytes on
        `device`, never decoded, so peak memory is about the file size. A QTensor where no Linear weight is (a norm
        scale, a bias) is small and is decoded."""
        config = config if config is not None else FluxConfig.from_state_dict(state_dict)
        with torch.device("meta"):
            model = cls(config)

        expected = model.state_dict(keep_vars=True)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            def few(names):
                return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems = ([f"{len(missing)} missing: {few(missing)}"] if missing else []) + \
                       ([f"{len(unexpected)} unexpected: {few(unexpected)}"] if unexpected else [])
            raise ValueError(f"state dict does not match the Flux model {config}: {'; '.join(problems)}")

        def dense(name: str) -> Tensor:
            value = state_dict[name]
            if isinstance(value, QTensor):
                value = value.dequantize(dtype)
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)}")
            return value.to(device=device, dtype=dtype)

        for name, module in list(model.named_modules()):
            weight = state_dict.get(f"{name}.weight")
            if isinstance(module, nn.Linear) and isinstance(weight, QTensor):
                if tuple(weight.shape) != tuple(module.weight.shape):
                    raise ValueError(f"{name}.weight: shape {tuple(weight.shape)}, the model expects "
                                     f"{tuple(module.weight.shape)}")
                bias = dense(f"{name}.bias") if module.bias is not None else None
                parent, _, leaf = name.rpartition(".")
                if weight.device != torch.device(device):
                    weight = weight.to(device)
                setattr(model.get_submodule(parent), leaf, QuantLinear(weight, bias))

        for name, param in list(model.named_parameters()):
            if param.is_meta:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, nn.Parameter(dense(name), requires_grad=False))
        return model.eval().requires_grad_(False)
