"""Forge bitsandbytes NF4 and FP8 (plain and ComfyUI scaled) safetensors checkpoints, built here in miniature."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

from engine.checkpoints import forge_nf4, fp8, load_checkpoint
from engine.checkpoints.safetensors_file import read_safetensors
from engine.errors import ModelFileError
from kernels.qtensor import QTensor
from tests import flux_fixtures
from tests.flux_fixtures import is_block_weight



def tiny_flux(depth=2, depth_single=1, seed=0) -> dict[str, torch.Tensor]:
    """A complete Flux-dev-shaped transformer (guidance embedding, qkv biases) with tiny dimensions, in bfloat16."""
    return flux_fixtures.tiny_flux(seed=seed, hidden=64, heads=4, depth=depth, depth_single=depth_single,
                                   context=64, vec=64)


def bnb_linear_state(weight: torch.Tensor, bias: torch.Tensor, compress_statistics: bool) -> dict:
    """What Forge saves for one Linear: bitsandbytes' Linear4bit quantized on the CPU, then its state_dict."""
    out_features, in_features = weight.shape
    lin = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=weight.dtype,
                            compress_statistics=compress_statistics, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=compress_statistics,
                                   quant_type="nf4")
    lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    lin = lin.to("cpu")  # quantizes
    assert lin.weight.bnb_quantized
    return {k: v.detach().clone() for k, v in lin.state_dict().items()}


def forge_nf4_state(sd, compress_statistics, quantize=is_block_weight, prefix=""):
    out = {}
    for name, t in sd.items():
        if name.endswith(".weight") and quantize(name):
            layer = name[:-len(".weight")]
            for k, v in bnb_linear_state(t, sd[layer + ".bias"], compress_statistics).items():
                out[f"{prefix}{layer}.{k}"] = v
        elif not (name.endswith(".bias") and quantize(name[:-len(".bias")] + ".weight")):
            out[prefix + name] = t
    return out


def bnb_dequantize(tensors: dict, weight: str, dtype=None) -> torch.Tensor:
    """bitsandbytes' own dequantization of a saved weight, through QuantState.from_dict as its loader does."""
    qs_dict = {k[len(weight) + 1:]: v for k, v in tensors.items() if k.startswith(weight + ".")}
    qs = bnbF.QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    if dtype is not None:
        qs = copy.copy(qs)
        qs.dtype = dtype
    return bnbF.dequantize_4bit(tensors[weight], qs)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    int_type = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(int_type), b.view(int_type))


@pytest.fixture(scope="module")
def flux_sd():
    return tiny_flux()


# ----------------------------------------------------------------------------------------------------------- NF4

@pytest.mark.parametrize("compress_statistics", [True, False], ids=["v1-double-quant", "v2"])
def test_forge_nf4_dequantizes_bit_identically_to_bitsandbytes(tmp_path, flux_sd, compress_statistics):
    saved = forge_nf4_state(flux_sd, compress_statistics)
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert saved[qkv].dtype == torch.uint8 and (qkv + ".absmax") in saved
    assert ((qkv + ".nested_absmax") in saved) == compress_statistics
    path = tmp_path / "flux-nf4.safetensors"
    save_file(saved, path)
    tensors, _ = read_safetensors(path)
    converted = forge_nf4.to_qtensors(tensors, path)

    assert not any(".absmax" in k or "quant_map" in k or "quant_state" in k for k in converted)
    weights = [k for k in flux_sd if is_block_weight(k)]
    assert set(converted) == set(flux_sd)
    for name in weights:
        qt = converted[name]
        assert isinstance(qt, QTensor) and qt.format == "NF4" and qt.shape == tuple(flux_sd[name].shape)
        assert same_bits(qt.dequantize(torch.bfloat16), bnb_dequantize(tensors, name)), name
        assert same_bits(qt.dequantize(torch.float32), bnb_dequantize(tensors, name, torch.float32)), name
        # codes copied as they are: the 32 code bytes of every block are bnb's bytes
        codes = qt.raw.reshape(-1, 36)[:, 4:].reshape(-1)
        assert torch.equal(codes, tensors[name].reshape(-1))
    for name, t in flux_sd.items():  # everything else untouched (a view of the file)
        if name not in weights:
            assert torch.equal(converted[name], t) and converted[name].dtype == t.dtype


def test_without_nf4_groups_returns_dict_unchanged(flux_sd):
    assert forge_nf4.to_qtensors(flux_sd, "x.safetensors") is flux_sd


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_load_checkpoint_forge_nf4_end_to_end(tmp_path, flux_sd, compress_statistics):
    # Forge's files are all-in-one: the transformer under model.diffusion_model., next to other models' tensors
    saved = forge_nf4_state(flux_sd, compress_statistics, prefix="model.diffusion_model.")
    saved["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3, dtype=torch.bfloat16)
    path = tmp_path / "flux1-dev-bnb-nf4.safetensors"
    save_file(saved, path)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(flux_sd)
    tensors, _ = read_safetensors(path)
    for name in flux_sd:
        if is_block_weight(name):
            assert isinstance(loaded[name], QTensor) and loaded[name].format == "NF4"
            expected = bnb_dequantize(tensors, "model.diffusion_model." + name)
            assert same_bits(loaded[name].dequantize(torch.bfloat16), expected)
        else:
            assert torch.equal(loaded[name], flux_sd[name])


def one_nf4_group(compress_statistics=True, shape=(64, 128)):
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05).to(torch.bfloat16)
    return {f"blk.{k}": v for k, v in bnb_linear_state(w, torch.zeros(shape[0], dtype=torch.bfloat16),
                                                      compress_statistics).items()}


def with_quant_state(tensors, key="blk.weight.quant_state.bitsandbytes__nf4", new_key=None, **changes):
    state = json.loads(bytes(tensors.pop(key).numpy()))
    state.update(changes)
    tensors[new_key or key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return tensors


def fp4_group():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    lin = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="fp4", compress_statistics=False)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="fp4", compress_statistics=False)
    return {f"blk.{k}": v for k, v in lin.to("cpu").state_dict().items()}


def corrupt_json(t):
    key = "blk.weight.quant_state.bitsandbytes__nf4"
    t[key] = t[key][:-5]
    return t


def replace(t, key, value):
    t[key] = value
    return t


@pytest.mark.parametrize("make, message", [
    (fp4_group, r"blk\.weight: bitsandbytes quant_type 'fp4' is unsupported"),
    (lambda: with_quant_state(one_nf4_group(), blocksize=128), r"blk\.weight: bitsandbytes blocksize 128"),
    (lambda: with_quant_state(one_nf4_group(False), shape=[64, 256]), r"blk\.weight: 4096 code bytes for logical"),
    (lambda: with_quant_state(one_nf4_group(False), shape=[128, 96]), r"not a multiple of 64"),
    (lambda: with_quant_state(one_nf4_group(), shape="64x128"), r"bad logical shape"),
    (lambda: corrupt_json(one_nf4_group()), r"blk\.weight: corrupt bitsandbytes quant state"),
    (lambda: with_quant_state(one_nf4_group(), nested_blocksize=128), r"nested_blocksize 128"),
    (lambda: with_quant_state(one_nf4_group(), nested_offset=None), r"bad nested_offset"),
    (lambda: replace(one_nf4_group(False), "blk.weight.absmax", torch.ones(64, dtype=torch.float32)),
     r"blk\.weight\[64, 128\]: inconsistent .*absmax must have shape \(128,\)"),
    (lambda: replace(one_nf4_group(), "blk.weight.nested_absmax", torch.ones(3, dtype=torch.float32)),
     r"inconsistent .*nested_absmax must have shape \(1,\)"),
    (lambda: replace(one_nf4_group(False), "blk.weight.absmax", torch.ones(128, dtype=torch.float16)),
     r"blk\.weight\.absmax: expected torch\.float32"),
    (lambda: replace(one_nf4_group(False), "blk.weight.quant_map", bnbF.get_4bit_type("fp4", device="cpu")),
     r"blk\.weight\.quant_map: not the NF4 code book"),
    (lambda: {k: v for k, v in one_nf4_group().items() if not k.endswith("nested_quant_map")},
     r"without blk\.weight\.nested_quant_map"),
    (lambda: {k: v for k, v in one_nf4_group().items() if k != "blk.weight"}, r"without its weight 'blk\.weight'"),
    (lambda: with_quant_state(one_nf4_group(), new_key="blk.weight.quant_state.bitsandbytes__fp4"),
     r"says quant_type 'nf4'"),
])
def test_nf4_errors(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    save_file(make(), path)
    tensors, _ = read_safetensors(path)
    with pytest.raises(ModelFileError, match=message) as e:
        forge_nf4.to_qtensors(tensors, path)
    assert e.value.path == str(path)


# ----------------------------------------------------------------------------------------------------------- FP8

def fp8_state(sd, scaled: bool, marker: torch.Tensor | None = None, scale_input=False, prefix=""):
    """Block weights cast to float8_e4m3fn; `scaled`: ComfyUI-style, weight / scale with scale = max|w| / 448."""
    out = {}
    for name, t in sd.items():
        if is_block_weight(name):
            layer = name[:-len(".weight")]
            if scaled:
                scale = (t.float().abs().max() / 448).reshape(())
                out[prefix + name] = (t.float() / scale).to(torch.float8_e4m3fn)
                out[f"{prefix}{layer}.scale_weight"] = scale
                if scale_input:
                    out[f"{prefix}{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
            else:
                out[prefix + name] = t.to(torch.float8_e4m3fn)
        else:
            out[prefix + name] = t
    if marker is not None:
        out[prefix + "scaled_fp8"] = marker
    return out


@pytest.mark.parametrize("scaled, marker, scale_input", [
    (False, None, False),
    (True, None, False),
    (True, torch.empty(2, dtype=torch.float8_e4m3fn), True),
    (True, torch.empty(0, dtype=torch.float8_e4m3fn), False),
    (True, torch.ones(1, dtype=torch.float32), True),
], ids=["plain", "scaled", "scaled-marker2", "scaled-marker0", "scaled-marker-f32"])
def test_fp8_checkpoints(tmp_path, flux_sd, scaled, marker, scale_input):
    saved = fp8_state(flux_sd, scaled, marker, scale_input)
    path = tmp_path / "flux-fp8.safetensors"
    save_file(saved, path)
    tensors, _ = read_safetensors(path)
    converted = fp8.apply_scales(forge_nf4.to_qtensors(tensors, path), path)
    assert set(converted) == set(flux_sd)  # scales, marker and input scales dropped
    for name, t in flux_sd.items():
        if not is_block_weight(name):
            assert converted[name] is tensors[name]
            continue
        qt = converted[name]
        assert isinstance(qt, QTensor) and qt.format == "F8_E4M3" and qt.shape == tuple(t.shape)
        assert torch.equal(qt.raw.reshape(t.shape), saved[name].view(torch.uint8))  # the file's bytes
        values = saved[name].float()  # torch's own float8 decoding
        if scaled:
            scale = saved[name[:-len(".weight")] + ".scale_weight"]
            assert qt.scale == scale.item()
            expected = values * scale  # float32 * float32 tensor
        else:
            assert qt.scale is None
            expected = values
        assert same_bits(qt.dequantize(torch.float32), expected)
        assert same_bits(qt.dequantize(torch.bfloat16), expected.to(torch.bfloat16))
        assert (qt.dequantize() - t.float()).abs().max() <= 0.07 * t.float().abs().max()  # e4m3: 3 mantissa bits


def test_load_checkpoint_fp8_end_to_end(tmp_path, flux_sd):
    saved = fp8_state(flux_sd, scaled=True, marker=torch.empty(2, dtype=torch.float8_e4m3fn), scale_input=True,
                      prefix="model.diffusion_model.")
    path = tmp_path / "flux1-dev-fp8-scaled.safetensors"
    save_file(saved, path)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(flux_sd)
    assert all(isinstance(loaded[n], QTensor) == is_block_weight(n) for n in flux_sd)


def test_fp8_newer_comfy_layout_and_small_tensors(tmp_path):
    w = torch.randn(64, 128).to(torch.float8_e4m3fn)
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    tensors = {"a.weight": w, "a.weight_scale": torch.tensor(0.5), "a.input_scale": torch.tensor(2.0),
               "a.comfy_quant": conf, "a.bias": torch.randn(64).to(torch.float8_e4m3fn), "b.weight": torch.ones(3)}
    out = fp8.apply_scales(tensors, tmp_path / "x.safetensors")
    assert list(out) == ["a.weight", "a.bias", "b.weight"]
    assert out["a.weight"].scale == 0.5 and out["a.weight"].format == "F8_E4M3"
    assert same_bits(out["a.weight"].dequantize(), w.float() * 0.5)
    assert out["a.bias"].dtype == torch.bfloat16 and torch.equal(out["a.bias"].float(), tensors["a.bias"].float())
    assert out["b.weight"] is tensors["b.weight"]
    assert fp8.apply_scales(out | {"c": torch.ones(2)}, "p") is not None
    no_fp8 = {"x.weight": torch.ones(2, 2)}
    assert fp8.apply_scales(no_fp8, "p") is no_fp8


@pytest.mark.parametrize("tensors, message", [
    ({"a.weight": torch.ones(64, 64).to(torch.float8_e5m2)}, r"'a\.weight' is float8_e5m2, which is unsupported"),
    ({"a.weight": torch.ones(64, 64).to(torch.float8_e4m3fn), "a.scale_weight": torch.ones(64)},
     r"a\.scale_weight: only a single per-tensor scale"),
    ({"a.weight": torch.ones(64, 64).to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor(float("nan"))},
     r"not finite"),
    ({"a.weight": torch.ones(64, 64).to(torch.float8_e4m3fn),
      "a.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}, r"'nvfp4' is unsupported"),
    ({"a.weight": torch.ones(64, 64).to(torch.float8_e4m3fn),
      "a.comfy_quant": torch.tensor(list(b'{"format'), dtype=torch.uint8)}, r"corrupt ComfyUI quantization config"),
    ({"a.weight": torch.ones(64, 64).to(torch.float8_e4m3fn), "b.weight": torch.ones(4, 4),
      "b.scale_weight": torch.tensor(1.0)}, r"b\.scale_weight: .* not float8_e4m3fn"),
])
def test_fp8_errors(tensors, message):
    with pytest.raises(ModelFileError, match=message):
        fp8.apply_scales(tensors, "bad.safetensors")
