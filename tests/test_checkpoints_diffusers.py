"""diffusers-format Flux transformers (sharded folders, single files) -> BFL names.

Oracle: diffusers' own BFL -> diffusers converter (`convert_flux_transformer_checkpoint_to_diffusers`) applied to a
tiny random BFL state dict; loading the result back must give exactly the original tensors. The converted dict is
also loaded (strict) into a tiny `diffusers.FluxTransformer2DModel`, and diffusers' final AdaLayerNormContinuous is
checked against BFL's LastLayer formula on our converted weights (the shift/scale half swap).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoints import diffusers as dconv, load_checkpoint
from engine.errors import ModelFileError
from kernels.qtensor import QTensor
from tests.flux_fixtures import diffusers_state_dict

pytest.importorskip("diffusers.loaders.single_file_utils")  # the oracle

HIDDEN, HEADS, DEPTH, DEPTH_SINGLE = 64, 2, 2, 2
HEAD_DIM = HIDDEN // HEADS
IN_CH, CONTEXT, VEC, MLP = 64, 32, 16, 4 * HIDDEN
AXES = (4, 14, 14)


def bfl_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of a tiny Flux-dev (guidance-distilled) transformer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "img_in": (HIDDEN, IN_CH), "txt_in": (HIDDEN, CONTEXT),
        "time_in.in_layer": (HIDDEN, 256), "time_in.out_layer": (HIDDEN, HIDDEN),
        "vector_in.in_layer": (HIDDEN, VEC), "vector_in.out_layer": (HIDDEN, HIDDEN),
        "guidance_in.in_layer": (HIDDEN, 256), "guidance_in.out_layer": (HIDDEN, HIDDEN),
        "final_layer.linear": (IN_CH, HIDDEN), "final_layer.adaLN_modulation.1": (2 * HIDDEN, HIDDEN),
    }
    for i in range(DEPTH):
        for s in ("img", "txt"):
            shapes |= {f"double_blocks.{i}.{s}_mod.lin": (6 * HIDDEN, HIDDEN),
                       f"double_blocks.{i}.{s}_attn.qkv": (3 * HIDDEN, HIDDEN),
                       f"double_blocks.{i}.{s}_attn.proj": (HIDDEN, HIDDEN),
                       f"double_blocks.{i}.{s}_mlp.0": (MLP, HIDDEN),
                       f"double_blocks.{i}.{s}_mlp.2": (HIDDEN, MLP)}
    for i in range(DEPTH_SINGLE):
        shapes |= {f"single_blocks.{i}.linear1": (3 * HIDDEN + MLP, HIDDEN),
                   f"single_blocks.{i}.linear2": (HIDDEN, HIDDEN + MLP),
                   f"single_blocks.{i}.modulation.lin": (3 * HIDDEN, HIDDEN)}
    sd = {}
    for stem, shape in shapes.items():
        sd[f"{stem}.weight"] = torch.randn(shape, generator=g).to(torch.bfloat16)
        sd[f"{stem}.bias"] = torch.randn(shape[0], generator=g).to(torch.bfloat16)
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(DEPTH) for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(DEPTH_SINGLE)]
    for stem in norms:
        for which in ("query_norm", "key_norm"):
            sd[f"{stem}.{which}.scale"] = torch.randn(HEAD_DIM, generator=g).to(torch.bfloat16)
    return sd


def diffusers_convert(bfl: dict) -> dict:
    return diffusers_state_dict(bfl, HIDDEN, MLP)


def diffusers_config() -> dict:
    return dict(patch_size=1, in_channels=IN_CH, out_channels=None, num_layers=DEPTH,
                num_single_layers=DEPTH_SINGLE, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                joint_attention_dim=CONTEXT, pooled_projection_dim=VEC, guidance_embeds=True, axes_dims_rope=AXES)


@pytest.fixture(scope="module")
def bfl():
    return bfl_state_dict()


@pytest.fixture(scope="module")
def diff(bfl):
    return diffusers_convert(bfl)


def write_sharded(folder: Path, tensors: dict, n_shards=2) -> Path:
    """A diffusers transformer folder as `save_pretrained` writes it: config.json, index json, shards."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        shard = f"diffusion_pytorch_model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[s::n_shards]
        save_file({n: tensors[n] for n in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= {n: shard for n in part}
    index = folder / dconv.INDEX_NAME
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **diffusers_config()}))
    return index


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# ------------------------------------------------------------------------------------------------ the oracle


def test_oracle_loads_into_diffusers_model(diff):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**diffusers_config())
    model.load_state_dict(diff, strict=True)


def test_final_adaln_matches_bfl_formula(bfl, diff):
    """diffusers' norm_out on its weights == BFL's LastLayer modulation on ours: the shift/scale swap is right."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    norm_out = AdaLayerNormContinuous(HIDDEN, HIDDEN, elementwise_affine=False, eps=1e-6)
    norm_out.load_state_dict({k[len("norm_out."):]: v.float() for k, v in diff.items() if k.startswith("norm_out.")})
    ours = dconv.to_bfl(diff, "mem")
    w = ours["final_layer.adaLN_modulation.1.weight"].float()
    b = ours["final_layer.adaLN_modulation.1.bias"].float()
    x, c = torch.randn(2, 5, HIDDEN), torch.randn(2, HIDDEN)
    shift, scale = torch.nn.functional.linear(torch.nn.functional.silu(c), w, b).chunk(2, dim=1)  # BFL LastLayer
    want = (1 + scale[:, None, :]) * torch.nn.functional.layer_norm(x, (HIDDEN,), eps=1e-6) + shift[:, None, :]
    with torch.no_grad():
        got = norm_out(x, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ loading


def test_sharded_folder_roundtrip(tmp_path, bfl, diff):
    index = write_sharded(tmp_path / "FLUX.1-dev" / "transformer", diff)
    (tmp_path / "FLUX.1-dev" / "ae.safetensors").write_bytes(b"not read")  # the BFL repo root has other files
    for path in (tmp_path / "FLUX.1-dev", index.parent, index, str(index)):
        assert_same(load_checkpoint(path), bfl)


def test_single_file_folder(tmp_path, bfl, diff):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(diff, str(folder / dconv.WEIGHTS_NAME))
    assert_same(load_checkpoint(tmp_path), bfl)
    assert_same(load_checkpoint(folder), bfl)


@pytest.mark.parametrize("prefix", ["", "transformer.", "model.diffusion_model."])
def test_single_file(tmp_path, bfl, diff, prefix):
    pytest.importorskip("engine.checkpoints.fp8")  # load_checkpoint's single-file path needs these
    pytest.importorskip("engine.checkpoints.forge_nf4")
    tensors = {prefix + k: v for k, v in diff.items()}
    if prefix:  # a pipeline's all-in-one file: other components beside the transformer are dropped
        tensors["vae.decoder.conv_in.weight"] = torch.zeros(4, 4)
    path = tmp_path / "flux-diffusers.safetensors"
    save_file(tensors, str(path))
    assert_same(load_checkpoint(path), bfl)


@pytest.mark.parametrize("prefix", ["", "transformer.", "model.diffusion_model."])
def test_to_bfl_prefixes_and_views(bfl, diff, prefix):
    tensors = {prefix + k: v for k, v in diff.items()}
    assert dconv.is_diffusers(tensors)
    out = dconv.to_bfl(tensors, "mem")
    assert_same(out, bfl)
    # only the concatenations and the final adaLN swap copy; everything else is the stored tensor itself
    assert out["img_in.weight"] is tensors[prefix + "x_embedder.weight"]
    assert out["double_blocks.1.txt_mlp.2.bias"] is tensors[prefix + "transformer_blocks.1.ff_context.net.2.bias"]
    assert out["single_blocks.0.linear2.weight"] is tensors[prefix + "single_transformer_blocks.0.proj_out.weight"]


def test_is_diffusers(bfl, diff):
    assert dconv.is_diffusers(diff)
    assert not dconv.is_diffusers(bfl)
    assert not dconv.is_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert not dconv.is_diffusers({"decoder.conv_in.weight": torch.zeros(1)})
    assert not dconv.is_diffusers({})


def test_without_guidance(bfl):
    schnell = {k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}
    assert_same(dconv.to_bfl(diffusers_convert(schnell), "mem"), schnell)


def test_quantized_parts_concatenate():
    def q(rows, fill):
        return QTensor(torch.full((rows, 68), fill, dtype=torch.uint8), "Q8_0", (rows, HIDDEN))

    tensors = {f"single_transformer_blocks.0.{n}.weight": q(r, i) for i, (n, r) in
               enumerate([("attn.to_q", HIDDEN), ("attn.to_k", HIDDEN), ("attn.to_v", HIDDEN), ("proj_mlp", MLP)])}
    tensors["norm_out.linear.weight"] = QTensor(torch.arange(2 * HIDDEN, dtype=torch.uint8)[:, None].expand(-1, 68)
                                                .contiguous(), "Q8_0", (2 * HIDDEN, HIDDEN))
    out = dconv.to_bfl(tensors, "mem")
    lin1 = out["single_blocks.0.linear1.weight"]
    assert isinstance(lin1, QTensor) and lin1.shape == (3 * HIDDEN + MLP, HIDDEN) and lin1.format == "Q8_0"
    assert lin1.raw[:, 0].tolist() == [0] * HIDDEN + [1] * HIDDEN + [2] * HIDDEN + [3] * MLP
    ada = out["final_layer.adaLN_modulation.1.weight"]
    assert ada.raw[:, 0].tolist() == list(range(HIDDEN, 2 * HIDDEN)) + list(range(HIDDEN))

    tensors["single_transformer_blocks.0.proj_mlp.weight"] = torch.zeros(MLP, HIDDEN)  # mixed with QTensors
    with pytest.raises(ModelFileError, match="linear1"):
        dconv.to_bfl(tensors, "mem")


# ------------------------------------------------------------------------------------------------ errors


def expect_error(path, *fragments):
    with pytest.raises(ModelFileError) as e:
        load_checkpoint(path)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    return e.value


def test_missing_shard(tmp_path, diff):
    index = write_sharded(tmp_path, diff)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    expect_error(tmp_path, str(index), "missing shard diffusion_pytorch_model-00002-of-00002.safetensors")


def test_tensor_absent_from_its_shard(tmp_path, diff):
    index = write_sharded(tmp_path, diff)
    data = json.loads(index.read_text())
    data["weight_map"]["transformer_blocks.9.attn.to_q.weight"] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    expect_error(index, "absent from their shard", "transformer_blocks.9.attn.to_q.weight")


def test_tensor_in_two_shards(tmp_path, diff):
    write_sharded(tmp_path, diff)
    names = sorted(diff)
    save_file({n: diff[n] for n in names[0::2] + names[1:2]},  # shard 1 also holds one of shard 2's tensors
              str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    expect_error(tmp_path, "is in two shards", repr(names[1]))


def test_tensor_not_in_index(tmp_path, diff):
    index = write_sharded(tmp_path, diff)
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    del data["weight_map"][name]
    index.write_text(json.dumps(data))
    expect_error(tmp_path, repr(name), "the index does not list it")


@pytest.mark.parametrize("text, problem", [
    ("{not json", "malformed index json"),
    ('{"metadata": {}}', 'no "weight_map"'),
    ('{"weight_map": {"x_embedder.weight": 3}}', "malformed index json"),
    ('{"weight_map": {"x_embedder.weight": "../elsewhere.safetensors"}}', "not a shard file name"),
])
def test_malformed_index(tmp_path, text, problem):
    index = tmp_path / dconv.INDEX_NAME
    index.write_text(text)
    expect_error(tmp_path, str(index), problem)
    expect_error(index, problem)


def test_empty_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    expect_error(tmp_path, "no loadable Flux transformer", dconv.INDEX_NAME, dconv.WEIGHTS_NAME)


def test_pickle_shards_refused(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    # a pickle that would run code if it were ever unpickled
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    expect_error(tmp_path, "only safetensors", "diffusion_pytorch_model.bin")
    (folder / "diffusion_pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"x_embedder.weight": "diffusion_pytorch_model.bin"}}))
    expect_error(folder / "diffusion_pytorch_model.bin.index.json", "only safetensors")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_unknown_and_incomplete_tensors(tmp_path, diff):
    extra = dict(diff, **{"transformer_blocks.0.attn.to_qkv_lora.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / dconv.WEIGHTS_NAME))
    expect_error(tmp_path, "not those of a diffusers Flux transformer", "transformer_blocks.0.attn.to_qkv_lora.weight")

    partial = {k: v for k, v in diff.items() if k != "single_transformer_blocks.1.proj_mlp.weight"}
    save_file(partial, str(tmp_path / dconv.WEIGHTS_NAME))
    expect_error(tmp_path, "single_blocks.1.linear1.weight", "only")
