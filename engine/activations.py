"""Peak activation bytes of a Flux forward pass and of a VAE decode, derived from the models' shapes.

Each formula is the largest set of tensors alive at once in `flux_model`'s code, traced by hand through the forward
(Python keeps a function's locals alive until it returns, so e.g. a block's q, k and v outlive its attention) and
checked against the live tensor bytes measured during real forwards of small models (tests/test_memory_plan.py).
Allocator rounding and kernel workspaces are not tensors and are not included here; the planner adds a reserve.
"""

from __future__ import annotations

import math

import torch

FLOAT32 = 4


def image_tokens(width: int, height: int) -> int:
    """Packed latent tokens of a width x height image: one per 16 x 16 pixels (8x VAE, then 2 x 2 patches)."""
    return math.ceil(height / 16) * math.ceil(width / 16)


def flux_forward_bytes(config, width: int, height: int, batch: int, txt_len: int, dtype: torch.dtype) -> int:
    """Peak bytes of the tensors a `Flux.forward` (with precomputed modulations) allocates, for a FluxConfig-shaped
    model: the largest of a double-stream and a single-stream block, with what the forward keeps alive around it."""
    e = dtype.itemsize
    D = config.hidden_size
    M = int(D * config.mlp_ratio)
    head_dim = D // config.num_heads
    img, txt = image_tokens(width, height), txt_len
    L = img + txt
    pe = 8 * L * head_dim  # RoPE rotations: (L, head_dim / 2, 2, 2) float32
    # apply_rope while k rotates: q's result, k's two products and their sum, all float32; below float32 also the
    # float32 copies of q and k
    rope = (4 if e == FLOAT32 else 6) * L * D * FLOAT32

    # double block: its inputs (img, txt), per stream q and k (normed) plus the qkv output v views (5 L D), the
    # joint q, k, v (3 L D); then either RoPE, or after attention (L D) one stream's MLP: the new stream, its
    # modulated input, the MLP hidden and its GELU
    double_in = L * D * e + pe
    double = double_in + max(8 * L * D * e + rope,
                             9 * L * D * e + (2 * D + 2 * M) * img * e,
                             9 * L * D * e + img * D * e + (2 * D + 2 * M) * txt * e)
    # single block: its input [txt, img] plus the double stream's txt; the modulated input, linear1's output
    # (qkv and MLP input), normed q and k; then RoPE, or at linear2: attention, GELU, their concat, linear2's output
    # (SDPA writes its output token-major, so the transpose back to (L, heads * head_dim) is a view, not a copy)
    single_in = L * D * e + txt * D * e + pe
    single = single_in + max((6 * D + M) * L * e + rope, (8 * D + 3 * M) * L * e)
    return batch * max(double, single)


def sampler_state_bytes(config, width: int, height: int, batch: int, txt_len: int, dtype: torch.dtype) -> int:
    """The denoising loop's inputs held across steps: the T5 states (compute dtype) and the latent, the velocity and
    the updated latent (float32)."""
    tokens = image_tokens(width, height)
    return batch * (txt_len * config.context_in_dim * dtype.itemsize + 3 * tokens * config.in_channels * FLOAT32)


# ----------------------------------------------------------------------------------------------------- VAE decode


def _group_norm_peak(c: int, e: int) -> int:
    """GroupNorm32 per pixel: below float32 it normalises a float32 copy (the copy and the result, both float32)."""
    return c * FLOAT32 if e == FLOAT32 else 2 * c * FLOAT32


def _resnet_peak(cin: int, cout: int, e: int) -> int:
    """A ResnetBlock per pixel, beyond its input: norm1, swish (input, sigmoid, product), conv1, then the same on
    conv1's output, and the residual sum (with the 1x1 shortcut's output when channels change)."""
    return max(_group_norm_peak(cin, e), 3 * cin * e, (cin + cout) * e,
               cout * e + _group_norm_peak(cout, e), 4 * cout * e, 3 * cout * e)


def _attention_peak(c: int, e: int) -> int:
    """The mid-block AttnBlock per pixel, beyond its input: normed input, q, k, v, SDPA's output and its transposed
    copy (one head over all positions; SDPA's own memory-efficient kernels keep no N x N matrix)."""
    return max(c * e + _group_norm_peak(c, e), 6 * c * e)


def vae_decode_bytes(params, latent_h: int, latent_w: int, batch: int, dtype: torch.dtype) -> int:
    """Peak bytes of the tensors `AutoEncoder.decode` allocates for a (batch, z, latent_h, latent_w) latent, for an
    AutoEncoderParams-shaped decoder: the largest layer, walking conv_in, the mid blocks and the up levels."""
    e = dtype.itemsize
    n = latent_h * latent_w
    z = 2 * params.z_channels * n * e  # the scaled latent and its shifted copy (decode's local)
    c = params.ch * params.ch_mult[-1]
    peak = z + c * n * e
    held = c * n * e
    peak = max(peak, z + held + _resnet_peak(c, c, e) * n, z + held + _attention_peak(c, e) * n)
    for level in reversed(range(len(params.ch_mult))):
        cout = params.ch * params.ch_mult[level]
        for _ in range(params.num_res_blocks + 1):
            peak = max(peak, z + c * n * e + _resnet_peak(c, cout, e) * n)
            c = cout
        if level:
            peak = max(peak, z + c * n * e + 8 * c * n * e)  # nearest 2x upsample, then its conv
            n *= 4
    # norm_out, swish and conv_out at full resolution (the output: out_ch channels)
    peak = max(peak, z + c * n * e + max(_group_norm_peak(c, e), 3 * c * e, (c + params.out_ch) * e) * n)
    return batch * peak


def vae_tiled_decode_bytes(params, latent_h: int, latent_w: int, batch: int, dtype: torch.dtype, tile: int) -> int:
    """Peak bytes of `AutoEncoder.decode_tiled(z, tile)`: one tile's decode on top of the float32 accumulators (the
    image and the weight map), or at the end the normalised image in float32 and in `dtype`."""
    if latent_h <= tile and latent_w <= tile:
        return vae_decode_bytes(params, latent_h, latent_w, batch, dtype)
    f = 2 ** (len(params.ch_mult) - 1)
    pixels = latent_h * f * latent_w * f
    accumulators = batch * params.out_ch * pixels * FLOAT32 + pixels * FLOAT32
    one_tile = vae_decode_bytes(params, min(tile, latent_h), min(tile, latent_w), batch, dtype)
    finish = batch * params.out_ch * pixels * (FLOAT32 + dtype.itemsize)
    return accumulators + max(one_tile, finish)
