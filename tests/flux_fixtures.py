"""Tiny Flux transformers with BFL's real tensor names, for tests that build their own model files."""

from __future__ import annotations

import torch

DOUBLE_LINEARS = ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")  # per stream (img_, txt_)
SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")


def flux_shapes(hidden=64, heads=2, depth=2, depth_single=2, in_channels=64, context=32, vec=16, mlp_ratio=4.0,
                guidance=True) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of a Flux transformer (BFL names; Flux-dev is hidden 3072, heads 24,
    depth 19, depth_single 38, context 4096, vec 768)."""
    mlp = int(hidden * mlp_ratio)
    head_dim = hidden // heads
    shapes = {}

    def linear(name, n_out, n_in):
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    linear("img_in", hidden, in_channels)
    linear("time_in.in_layer", hidden, 256)
    linear("time_in.out_layer", hidden, hidden)
    linear("vector_in.in_layer", hidden, vec)
    linear("vector_in.out_layer", hidden, hidden)
    if guidance:
        linear("guidance_in.in_layer", hidden, 256)
        linear("guidance_in.out_layer", hidden, hidden)
    linear("txt_in", hidden, context)
    for i in range(depth):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            linear(f"{block}_mod.lin", 6 * hidden, hidden)
            linear(f"{block}_attn.qkv", 3 * hidden, hidden)
            shapes[f"{block}_attn.norm.query_norm.scale"] = (head_dim,)
            shapes[f"{block}_attn.norm.key_norm.scale"] = (head_dim,)
            linear(f"{block}_attn.proj", hidden, hidden)
            linear(f"{block}_mlp.0", mlp, hidden)
            linear(f"{block}_mlp.2", hidden, mlp)
    for i in range(depth_single):
        block = f"single_blocks.{i}"
        linear(f"{block}.linear1", 3 * hidden + mlp, hidden)
        linear(f"{block}.linear2", hidden, hidden + mlp)
        shapes[f"{block}.norm.query_norm.scale"] = (head_dim,)
        shapes[f"{block}.norm.key_norm.scale"] = (head_dim,)
        linear(f"{block}.modulation.lin", 3 * hidden, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    linear("final_layer.linear", in_channels, hidden)
    return shapes


def is_block_weight(name: str) -> bool:
    """The tensors the published GGUF files quantize: the weights inside double and single blocks (all 2-D; the
    blocks' other parameters are biases and norm scales)."""
    return name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight")


def tiny_flux(seed=0, dtype=torch.bfloat16, **kwargs) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=generator) * 0.05).to(dtype)
            for name, shape in flux_shapes(**kwargs).items()}


def diffusers_state_dict(bfl: dict[str, torch.Tensor], hidden: int, mlp: int) -> dict[str, torch.Tensor]:
    """diffusers' own BFL -> diffusers converter (the independent oracle for names and layouts) on a tiny model.

    The converter hard-codes Flux's sizes when it splits single blocks' linear1 (3072, 3072, 3072, 12288); the
    `torch` it sees during the call splits with this model's sizes instead, the rest runs unchanged."""
    import pytest

    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

    class TinyTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def split(tensor, sizes, dim=0):
            if isinstance(sizes, (tuple, list)) and tuple(sizes) == (3072, 3072, 3072, 12288):
                sizes = (hidden, hidden, hidden, mlp)
            return torch.split(tensor, sizes, dim)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sfu, "torch", TinyTorch())
        out = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    return {k: v.contiguous() for k, v in out.items()}
