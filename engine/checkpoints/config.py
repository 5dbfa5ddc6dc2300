"""The Flux hyperparameters a checkpoint implies, read off its BFL tensor names and shapes (files carry none)."""

from __future__ import annotations

import re


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
