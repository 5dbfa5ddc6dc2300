"""BFL's sampler (black-forest-labs/flux `sampling.py`): noise, 2x2 packing and position ids, the shifted schedule,
the Euler loop, unpacking. Pure functions; the pipeline strings them together."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LATENT_CHANNELS = 16


def get_noise(num_samples: int, height: int, width: int, device, dtype: torch.dtype, seed: int) -> Tensor:
    """(B, 16, 2*ceil(H/16), 2*ceil(W/16)) standard normal noise, drawn by a seeded CPU generator (BFL seeds a
    generator on the target device; drawing on the CPU gives the same noise, so the same image, on every device)."""
    shape = (num_samples, LATENT_CHANNELS, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): BFL's `rearrange("b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)`."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack` for an image of `height` x `width` pixels."""
    b, _, d = x.shape
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    return x.reshape(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, 2 * h, 2 * w)


def image_ids(batch: int, latent_h: int, latent_w: int, device=None) -> Tensor:
    """(B, h/2 * w/2, 3) RoPE positions of the packed latent: (0, row, column)."""
    ids = torch.zeros(latent_h // 2, latent_w // 2, 3, device=device)
    ids[..., 1] = torch.arange(latent_h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(latent_w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(batch, -1, -1).contiguous()


def prepare(img: Tensor, txt: Tensor, vec: Tensor) -> dict[str, Tensor]:
    """BFL's `prepare` after the text encoders ran: packed image tokens, their ids, zero text ids."""
    bs, _, h, w = img.shape
    if txt.shape[0] == 1 and bs > 1:
        txt, vec = txt.expand(bs, -1, -1), vec.expand(bs, -1)
    txt_ids = torch.zeros(bs, txt.shape[1], 3, device=img.device)
    return dict(img=pack(img), img_ids=image_ids(bs, h, w, img.device), txt=txt, txt_ids=txt_ids, vec=vec)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (image). Dev shifts them towards 1 by mu, linear in the number of image
    tokens ((256, base_shift) to (4096, max_shift)); schnell does not shift."""
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def denoise(model, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor | None,
            timesteps: list[float], guidance: float = 4.0, *, modulations=None, true_cfg: float = 1.0,
            negative: tuple[Tensor, Tensor] | None = None, negative_modulations=None,
            callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """BFL's Euler loop: img += (t_next - t) * v(img, t) for each pair of schedule times.

    With `modulations` (the model's `precompute_modulations` for `timesteps[:-1]`), step i uses its precomputed
    adaLN outputs. `true_cfg` > 1 adds classifier-free guidance against `negative` = (txt, vec) of the negative prompt
    (diffusers' `true_cfg_scale`): v = v_neg + true_cfg * (v - v_neg). `callback(i, img)` runs after each step."""
    batch = img.shape[0]
    guidance_vec = torch.full((batch,), guidance, device=img.device, dtype=img.dtype)
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((batch,), t_curr, dtype=img.dtype, device=img.device)
        pred = model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec, guidance=guidance_vec,
                     modulations=modulations, step=None if modulations is None else i)
        if true_cfg != 1.0:
            neg_txt, neg_vec = negative
            neg = model(img=img, img_ids=img_ids, txt=neg_txt, txt_ids=txt_ids, y=neg_vec, timesteps=t_vec,
                        guidance=guidance_vec, modulations=negative_modulations,
                        step=None if negative_modulations is None else i)
            pred = neg + true_cfg * (pred - neg)
        img = img + (t_prev - t_curr) * pred
        if callback is not None:
            callback(i, img)
    return img
