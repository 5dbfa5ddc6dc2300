"""FLUX.1's VAE (BFL `ae.safetensors`): the LDM KL autoencoder with 16 latent channels, plus tiled decoding.

Parameter names are exactly BFL's (`encoder.*`, `decoder.*`, see black-forest-labs/flux
`src/flux/modules/autoencoder.py`), so `ae.safetensors` loads without renaming.

Latent scaling follows BFL: `encode` returns `scale * (z - shift)`, `decode` takes that and feeds `z / scale + shift` to
the decoder (scale 0.3611, shift 0.1159).

`encode` is deterministic: it returns the mean of the diagonal Gaussian posterior (the mode). BFL's reference
`DiagonalGaussian(sample=True)` adds `std * randn` noise; for img2img / inpainting an engine wants a reproducible latent,
and the posterior std of a trained VAE is tiny, so the mean is used (`AutoEncoder(params, sample_z=True)` or
`encode(x, sample=True, generator=...)` restores the sampling behaviour).

`decode_tiled` decodes a large latent in overlapping tiles and blends them with ramps, so peak memory is set by the tile
size, not by the image. Each tile only sees its own context: GroupNorm statistics and the decoder's mid-block
self-attention are computed per tile, so a tiled decode differs slightly from the untiled one (no seams, but not
bit-identical). A latent that fits in one tile is decoded exactly as `decode` would.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn



@dataclass
class AutoEncoderParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    # GroupNorm groups. FLUX has 32 groups of 4+ channels; a small demo autoencoder (ch 32) needs fewer groups, else
    # each group is one channel and a flat colour normalises to zero. Not in the tensor shapes: files that differ
    # from 32 say so in their safetensors metadata ("norm_groups").
    norm_groups: int = 32


FLUX_AE_PARAMS = AutoEncoderParams()


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm (same parameter names) whose statistics are computed in float32 also for bf16/fp16 activations."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm32(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, 1x1 convs for q/k/v/proj_out, residual."""

    def __init__(self, in_channels: int, groups: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.norm = _norm(in_channels, groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def attention(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        # (b, c, h, w) -> (b, 1, h*w, c): one head of width c
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(-1, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(b, c, hh, ww)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.attention(x))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, groups: int = 32):
        out_channels = in_channels if out_channels is None else out_channels
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric padding: one zero row/column at the bottom/right only
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, resolution: int, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 z_channels: int, groups: int = 32):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            down = nn.Module()
            down.block = block
            down.attn = nn.ModuleList()  # empty in FLUX's VAE; kept for BFL's module layout
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = self.down[i_level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int,
                 resolution: int, z_channels: int, groups: int = 32):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.ffactor = 2 ** (self.num_resolutions - 1)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, groups)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            up = nn.Module()
            up.block = block
            up.attn = nn.ModuleList()
            if i_level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)  # up[0] is the full-resolution level, as in BFL's files
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, n), evenly spread, neighbours overlapping >= `overlap`."""
    if n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, kind: str, device, margin: float = 0.0) -> Tensor:
    """Rising weights over `length` pixels, sampled at pixel centres: ~0 over the first `margin * length` pixels,
    a linear or cosine rise over the middle, 1 over the last `margin * length`; ramp(p) + ramp(length-1-p) == 1."""
    d = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    m = margin * length
    t = ((d - m) / max(length - 2 * m, 1e-6)).clamp(0.0, 1.0)
    if kind == "cosine":
        t = 0.5 - 0.5 * torch.cos(math.pi * t)
    elif kind != "linear":
        raise ValueError(f"unknown ramp {kind!r}: use 'linear' or 'cosine'")
    return t.clamp_min(1e-6)  # never exactly 0: every output pixel keeps a positive total weight


def _axis_weights(starts: list[int], tile: int, n: int, factor: int, kind: str, device,
                  margin: float = 0.0) -> list[Tensor]:
    """Per tile, the 1-D blend weight over its `tile*factor` output pixels: ramps up over the overlap with the previous
    tile, down over the overlap with the next one, 1 elsewhere (and at the image border)."""
    out = []
    for i, s in enumerate(starts):
        w = torch.ones(tile * factor if n > tile else n * factor, device=device)
        if i > 0:
            left = (starts[i - 1] + tile - s) * factor
            if left > 0:
                w[:left] *= _ramp(left, kind, device, margin)
        if i + 1 < len(starts):
            right = (s + tile - starts[i + 1]) * factor
            if right > 0:
                w[w.shape[0] - right:] *= _ramp(right, kind, device, margin).flip(0)
        out.append(w)
    return out


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams, sample_z: bool = False):
        super().__init__()
        self.params = params
        self.encoder = Encoder(resolution=params.resolution, in_channels=params.in_channels, ch=params.ch,
                               ch_mult=list(params.ch_mult), num_res_blocks=params.num_res_blocks,
                               z_channels=params.z_channels, groups=params.norm_groups)
        self.decoder = Decoder(resolution=params.resolution, in_channels=params.in_channels, ch=params.ch,
                               out_ch=params.out_ch, ch_mult=list(params.ch_mult),
                               num_res_blocks=params.num_res_blocks, z_channels=params.z_channels,
                               groups=params.norm_groups)
        self.sample_z = sample_z
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    @property
    def downscale(self) -> int:
        """Pixels per latent position along each axis (8 for FLUX)."""
        return 2 ** (len(self.params.ch_mult) - 1)

    def _dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, x: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled, shifted latents (B, z_channels, H/8, W/8) in the model's dtype.

        The posterior mean (deterministic) unless `sample` (default: the `sample_z` given at construction)."""
        moments = self.encoder(x.to(self._dtype()))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        z = mean
        if self.sample_z if sample is None else sample:
            std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            z = (mean.float() + std * noise).to(mean.dtype)
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: Tensor, tile: int | None = None, overlap: int | None = None) -> Tensor:
        """Scaled, shifted latents -> images (B, 3, 8h, 8w), roughly in [-1, 1], in the model's dtype.

        With `tile` (latent positions), decodes in overlapping tiles: see `decode_tiled`."""
        if tile is not None:
            return self.decode_tiled(z, tile=tile, overlap=overlap)
        z = z.to(self._dtype()) / self.scale_factor + self.shift_factor
        return self.decoder(z)

    @torch.no_grad()
    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int | None = None, ramp: str = "cosine",
                     margin: float = 0.0) -> Tensor:
        """Decode `z` in tiles of `tile` x `tile` latent positions whose neighbours overlap by at least `overlap`.

        Each tile is decoded on its own (peak activation memory ~ one tile's worth, the full-size image is only the
        3-channel output and a float32 weight map) and blended in pixel space with ramps across each overlap that
        sum to one, so there are no seams. Tiles see only local context: GroupNorm statistics and the mid-block
        attention are per tile, so the result differs slightly from `decode(z)`; it equals it when the latent fits
        in one tile. Returns the model's dtype (tiles are accumulated in float32).

        `tile`, `overlap` (default tile // 4): in latent positions (x8 pixels for FLUX). `ramp`: "cosine" or
        "linear". `margin`: fraction of each overlap, at the tile's inner edge, given (almost) no weight, to drop the
        zero-padding border of each tile; 0 ramps across the whole overlap.
        """
        overlap = tile // 4 if overlap is None else overlap
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin}")
        b, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        f = self.downscale
        z = z.to(self._dtype()) / self.scale_factor + self.shift_factor
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        wy = _axis_weights(ys, tile, h, f, ramp, z.device, margin)
        wx = _axis_weights(xs, tile, w, f, ramp, z.device, margin)
        out = torch.zeros(b, self.params.out_ch, h * f, w * f, device=z.device, dtype=torch.float32)
        total = torch.zeros(h * f, w * f, device=z.device, dtype=torch.float32)
        for y0, wyy in zip(ys, wy):
            for x0, wxx in zip(xs, wx):
                img = self.decoder(z[:, :, y0:y0 + tile, x0:x0 + tile]).float()
                weight = wyy[:, None] * wxx[None, :]
                py, px = slice(y0 * f, y0 * f + img.shape[-2]), slice(x0 * f, x0 * f + img.shape[-1])
                out[:, :, py, px] += img * weight
                total[py, px] += weight
                del img
        return (out / total).to(self._dtype())

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, params: AutoEncoderParams | None = None) -> AutoEncoder:
        """A model from BFL's autoencoder tensors (keys `encoder.*`, `decoder.*`; `engine.load_ae` reads them from
        `ae.safetensors`), copied to `device` and `dtype`. `params` defaults to the architecture read off the tensor
        shapes (`infer_params`). Missing, unexpected or mis-shaped tensors raise ValueError."""
        params = infer_params(state_dict) if params is None else params
        with torch.device("meta"):
            model = cls(params)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensors, e.g. {missing[:4]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:4]}")
        if problems:
            raise ValueError("not a FLUX autoencoder (ae.safetensors) for these params: " + "; ".join(problems))
        bad = [f"{k} {list(state_dict[k].shape)} (expected {list(s)})" for k, s in expected.items()
               if tuple(state_dict[k].shape) != tuple(s)]
        bad += [f"{k} has dtype {state_dict[k].dtype}" for k in expected if not state_dict[k].is_floating_point()]
        if bad:
            raise ValueError(f"{len(bad)} tensors of the wrong shape or type, e.g. {bad[:3]}")
        state = {k: state_dict[k].to(device=device, dtype=dtype, copy=True) for k in expected}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)


def infer_params(tensors: Mapping[str, Tensor]) -> AutoEncoderParams:
    """The architecture of a BFL-named autoencoder state dict, from its tensor shapes (scale/shift: FLUX's; GroupNorm
    groups: 32, as the shapes cannot tell); ValueError when it is not an autoencoder's."""
    try:
        conv_in = tensors["encoder.conv_in.weight"]
        ch, in_channels = conv_in.shape[0], conv_in.shape[1]
        levels = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        num_res_blocks = len({m.group(1) for k in tensors if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
        ch_mult = []
        for i in range(len(levels)):
            last = tensors[f"encoder.down.{i}.block.{num_res_blocks - 1}.conv2.weight"]
            ch_mult.append(last.shape[0] // ch)
        z_channels = tensors["decoder.conv_in.weight"].shape[1]
        out_ch = tensors["decoder.conv_out.weight"].shape[0]
    except (KeyError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"not a FLUX autoencoder: cannot read the architecture ({type(e).__name__}: {e})") from None
    if not levels or levels != list(range(len(levels))) or num_res_blocks < 1 or ch < 1:
        raise ValueError("not a FLUX autoencoder: no encoder.down.N.block.M tensors")
    return AutoEncoderParams(resolution=256, in_channels=in_channels, ch=ch, out_ch=out_ch, ch_mult=ch_mult,
                             num_res_blocks=num_res_blocks, z_channels=z_channels)
