"""Reading Flux checkpoints in the layouts users have, built here with the gguf and safetensors libraries."""

import math
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import ModelFileError
from engine.checkpoints import infer_flux_config, load_checkpoint
from kernels import QTensor, reference
from tests.flux_fixtures import flux_shapes, is_block_weight, tiny_flux

LEFTOVER_NUMPY = {"F32": np.float32, "F16": np.float16}


def write_city96_gguf(path, state_dict, block_type, leftover, prefix="", architecture=True):
    """A GGUF laid out like city96's Flux files: block weights in `block_type`, everything else in `leftover`."""
    writer = gguf.GGUFWriter(path, "flux")
    if not architecture:  # stable-diffusion.cpp files may lack it
        writer.kv_data[0].pop("general.architecture")
    writer.add_quantization_version(2)
    for name, tensor in state_dict.items():
        x = tensor.float().numpy()
        if is_block_weight(name) and block_type not in ("F16", "BF16"):
            data = reference.quantize(x, block_type)
            writer.add_tensor(prefix + name, data, raw_dtype=gguf.GGMLQuantizationType[block_type])
        elif leftover == "BF16":
            writer.add_tensor(prefix + name, reference.quantize(x, "BF16").view(np.uint16).reshape(x.shape),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(prefix + name, x.astype(LEFTOVER_NUMPY[leftover]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_reference_values(path):
    """name -> float32 values as the gguf package itself decodes them."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


@pytest.mark.parametrize("block_type, leftover", [("Q4_K", "F32"), ("Q8_0", "F16"), ("Q4_0", "F16"),
                                                  ("Q6_K", "F32"), ("Q2_K", "F32"), ("BF16", "BF16")])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "model."])
def test_gguf_in_published_layout(tmp_path, block_type, leftover, prefix):
    sd = tiny_flux(hidden=256, heads=2, context=256, vec=256)
    path = tmp_path / "flux.gguf"
    write_city96_gguf(path, sd, block_type, leftover, prefix, architecture=prefix != "model.")
    loaded = load_checkpoint(path)
    expected = gguf_reference_values(path)
    assert set(loaded) == set(sd)
    for name, value in loaded.items():
        if is_block_weight(name) and block_type != "BF16":
            assert isinstance(value, QTensor) and value.format == block_type and value.shape == sd[name].shape
            value = value.dequantize()
        else:
            assert isinstance(value, torch.Tensor) and value.dtype == {"F32": torch.float32, "F16": torch.float16,
                                                                       "BF16": torch.bfloat16}[leftover]
        assert value.shape == sd[name].shape
        assert torch.equal(value.float(), torch.from_numpy(expected[prefix + name].copy()).float()), name


def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_gguf_is_memory_mapped_not_copied(tmp_path):
    sd = tiny_flux(hidden=512, heads=4, context=256, vec=256, depth=2, depth_single=4)
    path = tmp_path / "big.gguf"
    write_city96_gguf(path, sd, "Q8_0", "F16")
    size = os.path.getsize(path)
    before = rss_bytes()
    loaded = load_checkpoint(path)
    assert rss_bytes() - before < size / 4, "loading copied the tensor data"
    assert loaded["double_blocks.0.img_attn.qkv.weight"].raw.numel() > 0


@pytest.mark.parametrize("prefix, extra", [("", {}), ("model.diffusion_model.", {"first_stage_model.decoder.conv_in.weight": (4, 4)}),
                                           ("diffusion_model.", {})])
def test_safetensors_bfl_and_comfyui(tmp_path, prefix, extra):
    sd = tiny_flux(guidance=False)
    path = tmp_path / "flux.safetensors"
    stored = {prefix + name: t for name, t in sd.items()} | {name: torch.zeros(shape) for name, shape in extra.items()}
    save_file(stored, path)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(sd)
    assert all(loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], sd[name]) for name in sd)


def meta_state_dict(**kwargs):
    return {name: torch.empty(shape, device="meta") for name, shape in flux_shapes(**kwargs).items()}


def test_config_of_real_flux_dev_and_schnell():
    dev = meta_state_dict(hidden=3072, heads=24, depth=19, depth_single=38, context=4096, vec=768)
    config = infer_flux_config(dev)
    assert config == dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                          mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                          theta=10_000, qkv_bias=True, guidance_embed=True)
    n_params = sum(math.prod(t.shape) for t in dev.values())
    assert abs(n_params / 1e9 - 11.90) < 0.01
    quantized = [name for name, t in dev.items() if is_block_weight(name)]
    assert len(quantized) == 304
    schnell = meta_state_dict(hidden=3072, heads=24, depth=19, depth_single=38, context=4096, vec=768, guidance=False)
    assert infer_flux_config(schnell)["guidance_embed"] is False
    fill = meta_state_dict(hidden=3072, heads=24, depth=1, depth_single=1, context=4096, vec=768, in_channels=384)
    assert infer_flux_config(fill)["in_channels"] == 384


# ------------------------------------------------------------------------------------------------- bad input

def tiny_gguf(tmp_path, name="flux.gguf"):
    path = tmp_path / name
    write_city96_gguf(path, tiny_flux(hidden=256, heads=2, context=256, vec=256, depth=1, depth_single=1), "Q4_0", "F16")
    return path


def assert_model_file_error(path, *fragments):
    with pytest.raises(ModelFileError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_pickles_are_refused_unread(tmp_path):
    for name, content in [("model.ckpt", b"PK\x03\x04rest"), ("model.safetensors", b"\x80\x02}q\x00."),
                          ("weights.pt", b"anything")]:
        path = tmp_path / name
        path.write_bytes(content)
        assert_model_file_error(path, "pickle")


def test_non_flux_files(tmp_path):
    llm = tmp_path / "llm.gguf"
    writer = gguf.GGUFWriter(llm, "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    assert_model_file_error(llm, "architecture 'llama'")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4), "conditioner.x": torch.zeros(1)},
              sdxl)
    assert_model_file_error(sdxl, "not a Flux transformer", "UNet")
    missing = tmp_path / "partial.safetensors"
    sd = tiny_flux()
    del sd["txt_in.weight"]
    save_file(sd, missing)
    assert_model_file_error(missing, "txt_in.weight")
    assert_model_file_error(tmp_path / "absent.gguf", "no such file")


def patched(path, offset, data, tmp_path):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    out = tmp_path / f"patched_{offset}.gguf"
    out.write_bytes(bytes(raw))
    return out


def tensor_info_offset(path, name):
    """Byte offset of a tensor's name in the header (its info follows)."""
    return path.read_bytes().index(name.encode())


def test_gguf_header_errors(tmp_path):
    path = tiny_gguf(tmp_path)
    raw = path.read_bytes()
    assert_model_file_error(patched(path, 0, b"GGML", tmp_path))  # then it is no known format at all
    assert_model_file_error(patched(path, 4, (7).to_bytes(4, "little"), tmp_path), "version 7")
    assert_model_file_error(patched(path, 8, (1 << 60).to_bytes(8, "little"), tmp_path), "absurd GGUF counts")
    assert_model_file_error(patched(path, 16, (1 << 40).to_bytes(8, "little"), tmp_path), "absurd GGUF counts")
    name = "double_blocks.0.img_attn.qkv.weight"
    at = tensor_info_offset(path, name) + len(name)
    assert_model_file_error(patched(path, at, (9).to_bytes(4, "little"), tmp_path), "dimensions")
    assert_model_file_error(patched(path, at + 4, (1 << 62).to_bytes(8, "little"), tmp_path), "impossible dimensions")
    assert_model_file_error(patched(path, at + 20, (99).to_bytes(4, "little"), tmp_path), "GGML type id 99")
    assert_model_file_error(patched(path, at + 24, (1 << 40).to_bytes(8, "little"), tmp_path), "outside the file")
    for length in (3, 20, len(raw) // 3, len(raw) - 1):
        truncated = tmp_path / f"truncated_{length}.gguf"
        truncated.write_bytes(raw[:length])
        assert_model_file_error(truncated)


@pytest.mark.parametrize("content", [b"", b"GG", b"not a gguf file at all"])
def test_broken_gguf_is_reported_as_gguf(tmp_path, content):
    path = tmp_path / "flux.gguf"
    path.write_bytes(content)
    message = assert_model_file_error(path, "GGUF")
    assert "safetensors" not in message


def test_empty_safetensors_is_reported_as_safetensors(tmp_path):
    path = tmp_path / "flux.safetensors"
    path.write_bytes(b"")
    assert_model_file_error(path, "too short for a safetensors file")


def test_gguf_duplicate_tensor_names(tmp_path):
    path = tiny_gguf(tmp_path)
    raw = path.read_bytes()
    first, second = b"double_blocks.0.img_attn.qkv.weight", b"double_blocks.0.txt_attn.qkv.weight"
    dup = tmp_path / "dup.gguf"
    dup.write_bytes(raw.replace(second, first))
    assert_model_file_error(dup, "duplicate tensor name")


def test_safetensors_header_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 2)}, good)
    raw = good.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    cases = {
        "huge_header": (1 << 62).to_bytes(8, "little") + raw[8:],
        "bad_json": raw[:8] + b"{" * header_len + raw[8 + header_len:],
        "past_end": raw[:8] + raw[8:8 + header_len].replace(b"[0,16]", b"[0,99]") + raw[8 + header_len:],
        "duplicate": None,
        "tiny": b"\x01\x02",
    }
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    cases["duplicate"] = len(header).to_bytes(8, "little") + header + bytes(16)
    for case, content in cases.items():
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(content)
        assert_model_file_error(path)
