"""LoRAs on the Flux transformer: every file layout against diffusers' `load_lora_weights` (or dense weights plus the
deltas, computed here from the file's tensors), runtime LoRAs on quantized weights against "dequantize, add the delta,
matmul", merge mode, the memory plan, block streaming and bad files."""

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ModelFileError
from engine.lora import LoRA, LoRALinear, LoRAStack, LoRAUpdate, read_lora
from engine.lora.merge import merged_linear
from engine.lora.runtime import linear_modules
from engine.memory import GiB, plan_memory
from engine.pipeline import FluxPipeline
from engine.sampling import pack, unpack
from kernels.formats import get_format
from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear
from tests.flux_fixtures import flux_shapes
from tests.lora_fixtures import diffusers_rows, kohya_from_peft, peft_lora, random_factors, write
from tests.test_pipeline import HEAD_DIM, HEADS, reference_pipeline, write_diffusers_folder

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPTS = ["a red circle on a blue background", "a photo of a cat"]
WIDTH, HEIGHT, STEPS = 48, 32, 2
TINY = dict(hidden=HEADS * HEAD_DIM, heads=HEADS, depth=1, depth_single=2, guidance=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("flux"), guidance=True)


@pytest.fixture(scope="module")
def start_latents():
    return torch.randn(2, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))


def ours(pipe, latents):
    return pipe(PROMPTS, width=WIDTH, height=HEIGHT, steps=STEPS, guidance=3.5, latents=latents,
                output_type="latent", progress=False)


def theirs(folder, lora_path, latents):
    """diffusers' FluxPipeline with the LoRA loaded by its `load_lora_weights` (PEFT)."""
    ref = reference_pipeline(folder)
    ref.load_lora_weights(str(lora_path))
    out = ref(PROMPTS, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, guidance_scale=3.5,
              latents=pack(latents), output_type="latent", max_sequence_length=512).images
    return unpack(out, HEIGHT, WIDTH)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def with_lora(pipe, path, latents) -> tuple[LoRA, torch.Tensor]:
    """The LoRA in `path` and our latents with it loaded; unloaded again after."""
    lora = pipe.load_lora(path)
    try:
        return lora, ours(pipe, latents)
    finally:
        pipe.unload_loras()


def assert_matches(got, want, what: str, tolerance: float = 1e-4) -> None:
    rel = relative(got, want)
    print(f"{what}: relative error {rel:.2e}")
    assert rel <= tolerance, rel


@pytest.fixture(scope="module")
def pipe(folder):
    return FluxPipeline.from_folder(folder, device="cpu", dtype=torch.float32, prompt_cache=False)


@pytest.fixture(scope="module")
def peft_file(folder, tmp_path_factory):
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(folder / "transformer")
    path = tmp_path_factory.mktemp("loras") / "peft.safetensors"
    return write(peft_lora(transformer, rank=4, alpha=8.0, seed=10), path)


@pytest.fixture(scope="module")
def peft_reference(folder, peft_file, start_latents):
    return theirs(folder, peft_file, start_latents)


def test_peft_lora_equals_diffusers_load_lora_weights(pipe, peft_file, peft_reference, start_latents):
    base = ours(pipe, start_latents)
    lora, got = with_lora(pipe, peft_file, start_latents)
    assert lora.format == "diffusers" and set(lora.modules) == set(linear_modules(pipe.transformer))  # every Linear
    assert_matches(got, peft_reference, "PEFT LoRA vs diffusers")
    assert relative(base, peft_reference) > 0.05  # the LoRA really changed the result
    assert relative(ours(pipe, start_latents), base) == 0  # unloaded: the model is as it was


def test_kohya_rewrite_on_bfl_names_gives_the_same_latents(pipe, peft_file, peft_reference, start_latents, tmp_path):
    from safetensors.torch import load_file

    rows = diffusers_rows(**TINY)
    out_features = {name[:-len(".weight")]: shape[0] for name, shape in flux_shapes(**TINY).items()}
    path = write(kohya_from_peft(load_file(str(peft_file)), rows, out_features), tmp_path / "kohya.safetensors")
    lora, got = with_lora(pipe, path, start_latents)
    assert lora.format == "kohya"
    assert_matches(got, peft_reference, "kohya rewrite vs diffusers' PEFT result")


def xlabs_lora(hidden: int, depth: int, depth_single: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """XLabs' processor keys: double blocks' image (1) and text (2) qkv / proj, single blocks' qkv / proj."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(prefix, n_out, n_in):
        down, up = random_factors(n_out, n_in, rank, generator)
        tensors[f"{prefix}.down.weight"], tensors[f"{prefix}.up.weight"] = down, up

    for i in range(depth):
        for stream in "12":
            add(f"double_blocks.{i}.processor.qkv_lora{stream}", 3 * hidden, hidden)
            add(f"double_blocks.{i}.processor.proj_lora{stream}", hidden, hidden)
    for i in range(depth_single):
        add(f"single_blocks.{i}.processor.qkv_lora", 3 * hidden, hidden)
        add(f"single_blocks.{i}.processor.proj_lora", hidden, 5 * hidden)
    return tensors


def test_xlabs_lora_equals_diffusers(folder, pipe, start_latents, tmp_path):
    path = write(xlabs_lora(TINY["hidden"], 1, 2, rank=4, seed=11), tmp_path / "xlabs.safetensors")
    lora, got = with_lora(pipe, path, start_latents)
    assert lora.format == "xlabs"
    assert_matches(got, theirs(folder, path, start_latents), "XLabs LoRA vs diffusers")


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_metadata_scales_as_peft_does(folder, tmp_path, rslora):
    """lora_alpha / r (or / sqrt(r)) with an alpha_pattern entry, read from `lora_adapter_metadata`: every update's
    scale equals the `scaling` PEFT gives the layer its down-projection went to."""
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(folder / "transformer")
    tensors = peft_lora(transformer, rank=4, alpha=None, seed=12)
    targets = sorted({k[len("transformer."):-len(".lora_A.weight")] for k in tensors if k.endswith("lora_A.weight")})
    config = {"r": 4, "lora_alpha": 6, "alpha_pattern": {"single_transformer_blocks.1.proj_out": 2},
              "use_rslora": rslora, "target_modules": targets}
    metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path = write(tensors, tmp_path / "meta.safetensors", metadata)
    state_dict, alphas, read_metadata = diffusers.FluxPipeline.lora_state_dict(  # as load_lora_weights reads it
        str(path), return_alphas=True, return_lora_metadata=True)
    diffusers.FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=transformer,
                                                      metadata=read_metadata)
    peft_scales = {}
    for module in transformer.modules():
        if hasattr(module, "lora_A") and hasattr(module, "scaling") and module.scaling:
            (adapter, scale), = module.scaling.items()
            peft_scales[module.lora_A[adapter].weight.detach().numpy().tobytes()] = scale
    pipe = FluxPipeline.from_folder(folder, device="cpu", dtype=torch.float32, prompt_cache=False)
    lora = read_lora(path, pipe.transformer)
    assert len(lora.updates) == len(peft_scales) == len(targets)
    for update in lora.updates:
        assert update.scale == pytest.approx(peft_scales[update.down.numpy().tobytes()], rel=1e-6), update.module
    assert len({round(s, 6) for s in peft_scales.values()}) == 2  # the pattern really gave one module its own


def bfl_lora(model: nn.Module, layout: str, rank: int, seed: int) -> tuple[dict, dict]:
    """A random LoRA on every Linear of `model` under BFL names, in kohya's layout or with PEFT factor names; also
    returns each Linear's dense delta (alpha / rank · up @ down), computed here."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name, module in linear_modules(model).items():
        down, up = random_factors(module.out_features, module.in_features, rank, generator)
        alpha = float(rank) / 2
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
        else:
            key = f"diffusion_model.{name}"
            tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[name] = alpha / rank * up @ down
    return tensors, deltas


def test_two_weighted_loras_equal_their_deltas_on_dense_weights(folder, pipe, start_latents, tmp_path):
    base = ours(pipe, start_latents)
    first, first_deltas = bfl_lora(pipe.transformer, "kohya", rank=3, seed=13)
    second, second_deltas = bfl_lora(pipe.transformer, "bfl", rank=5, seed=14)
    dense = FluxPipeline.from_folder(folder, device="cpu", dtype=torch.float32, prompt_cache=False)
    with torch.no_grad():
        for name, module in linear_modules(dense.transformer).items():
            module.weight += 0.7 * first_deltas[name] - 0.3 * second_deltas[name]
    want = ours(dense, start_latents)

    assert pipe.load_lora(write(first, tmp_path / "a.safetensors"), weight=0.7).format == "kohya"
    assert pipe.load_lora(write(second, tmp_path / "b.safetensors"), weight=-0.3).format == "bfl"
    try:
        assert_matches(ours(pipe, start_latents), want, "two LoRAs (0.7, -0.3) vs dense weights plus their deltas")
        pipe.lora_mode = "merge"  # dense float32 weights: merging is exact up to rounding
        assert_matches(ours(pipe, start_latents), want, "the same, merged")
        pipe.set_lora_weights(0.0, 0.0)
        assert relative(ours(pipe, start_latents), base) <= 1e-6
        pipe.lora_mode = "runtime"
        pipe.set_lora_weights([0.7, -0.3])
        assert relative(ours(pipe, start_latents), want) <= 1e-4
        with pytest.raises(ValueError, match="2 loaded"):
            pipe.set_lora_weights(1.0)
        assert [entry["weight"] for entry in pipe.loras.describe()] == [0.7, -0.3]
    finally:
        pipe.unload_loras()
        pipe.lora_mode = "runtime"
    assert relative(ours(pipe, start_latents), base) == 0


# ------------------------------------------------------------------------------------------------ quantized bases


def random_qtensor(fmt: str, out_features: int, in_features: int, seed: int) -> QTensor:
    """Random blocks of `fmt` with small finite scales: a valid quantized weight without running a quantizer."""
    f = get_format(fmt)
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (out_features * in_features // f.block_size, f.block_bytes), dtype=torch.uint8,
                           generator=generator)
    for field, size in f.fields:
        if field in ("d", "dmin", "m", "absmax"):
            value = torch.tensor([0.002 if size == 2 else 0.05], dtype=torch.float16 if size == 2 else torch.float32)
            blocks[:, f.offset(field):f.offset(field) + size] = value.view(torch.uint8)
    return QTensor(blocks.reshape(out_features, -1), f.name, (out_features, in_features))


def sliced_updates(out_features: int, in_features: int, seed: int) -> list[tuple[LoRAUpdate, int]]:
    """Updates from two LoRAs: the first on all rows, the second on two row slices (as a q and a k would be)."""
    generator = torch.Generator().manual_seed(seed)
    whole = LoRAUpdate("m", *random_factors(out_features, in_features, 3, generator), scale=0.5)
    q = LoRAUpdate("m", *random_factors(16, in_features, 2, generator), scale=2.0, row_start=0)
    k = LoRAUpdate("m", *random_factors(32, in_features, 2, generator), scale=2.0, row_start=16)
    return [(whole, 0), (q, 1), (k, 1)]


def dense_reference(weight: torch.Tensor, updates, weights) -> torch.Tensor:
    """Dequantized (or dense) weight plus every delta, in float32: what runtime and merge mode must agree with."""
    weight = weight.clone().float()
    for update, source in updates:
        weight[update.row_start:update.row_stop] += weights[source] * update.delta()
    return weight


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "NF4"])
def test_runtime_lora_on_quantized_weights_equals_dequantize_add_matmul(fmt):
    q = random_qtensor(fmt, 64, 256, seed=20)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(21))
    updates, weights = sliced_updates(64, 256, seed=22), [0.7, -0.3]
    layer = LoRALinear(QuantLinear(q, bias), updates, weights, torch.float32)
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(23))
    want = F.linear(x, dense_reference(q.dequantize(), updates, weights), bias)
    got = layer(x)
    assert relative(got, want) <= 2e-6, relative(got, want)
    assert relative(F.linear(x, q.dequantize(), bias), want) > 0.01  # the updates are not negligible
    assert torch.equal(layer.base.raw, q.raw)  # the stored weight is untouched
    assert [(r0, r1) for _, r0, r1, _, _ in layer._segments] == [(0, 16), (0, 64), (16, 48)]
    layer.set_weights([0.0, 1.0])
    assert relative(layer(x), F.linear(x, dense_reference(q.dequantize(), updates, [0.0, 1.0]), bias)) <= 2e-6


@pytest.mark.parametrize("fmt, scale", [("Q8_0", None), ("NF4", None), ("F8_E4M3", 0.02)])
def test_merge_requantizes_to_the_same_format(fmt, scale):
    generator = torch.Generator().manual_seed(24)
    dense = torch.randn(64, 128, generator=generator) / 128**0.5
    q = QTensor.quantize(dense if scale is None else dense / scale, fmt)
    q = QTensor(q.raw, q.format, q.shape, scale)
    updates, weights = sliced_updates(64, 128, seed=25), [0.7, -0.3]
    merged = merged_linear("m", QuantLinear(q, None), [(u, weights[s]) for u, s in updates])
    want = dense_reference(q.dequantize(), updates, weights)
    expected = QTensor.quantize(want if scale is None else want / scale, fmt)
    assert isinstance(merged, QuantLinear) and merged.weight.format == q.format and merged.weight.scale == scale
    assert torch.equal(merged.raw, expected.raw)
    # lossy: the merged weight carries the format's rounding error, not more
    assert relative(merged.weight.dequantize(), want) <= 1.5 * relative(q.dequantize(), dense) + 1e-6


def test_merge_into_a_dense_linear_keeps_its_dtype():
    linear = nn.Linear(128, 64).to(torch.bfloat16).requires_grad_(False)
    updates, weights = sliced_updates(64, 128, seed=26), [1.0, 0.5]
    merged = merged_linear("m", linear, [(u, weights[s]) for u, s in updates])
    want = dense_reference(linear.weight, updates, weights).to(torch.bfloat16)
    assert merged.weight.dtype == torch.bfloat16 and torch.equal(merged.weight, want)
    assert torch.equal(merged.bias, linear.bias)


# ------------------------------------------------------------------------------------------------ bad files


def kohya_qkv(hidden: int, rows: int | None = None) -> dict[str, torch.Tensor]:
    down, up = random_factors(rows or 3 * hidden, hidden, 2, torch.Generator().manual_seed(30))
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}


@pytest.mark.parametrize("tensors, message", [
    ({"foo.bar": torch.zeros(2), "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 64),
      "lora_unet_nowhere.lora_up.weight": torch.zeros(2, 2)},
     "3 key(s) not understood as a Flux transformer LoRA: foo.bar, lora_unet_nowhere.lora_down.weight, "
     "lora_unet_nowhere.lora_up.weight"),
    ({"transformer.transformer_blocks.0.attn.to_q.dora_scale": torch.zeros(1, 64)}, "to_q.dora_scale"),
    (kohya_qkv(64, rows=100), "lora_unet_double_blocks_0_img_attn_qkv: factors [2, 64] and [100, 2] do not fit"),
    ({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 64)}, "lora_unet_img_in: up-projection missing"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)},
     "no LoRA for the Flux transformer: the file holds only text-encoder parts"),
])
def test_bad_files_are_one_model_file_error_naming_the_keys(pipe, tmp_path, tensors, message):
    path = write(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match="bad.safetensors") as info:
        pipe.load_lora(path)
    assert message in str(info.value)
    assert not pipe.loras.loras


def test_pickles_and_non_safetensors_files_are_refused(pipe, tmp_path):
    (tmp_path / "lora.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(ModelFileError, match="pickle-based LoRA file"):
        pipe.load_lora(tmp_path / "lora.pt")
    (tmp_path / "lora.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        pipe.load_lora(tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError, match="no such file"):
        pipe.load_lora(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("metadata", ["{not json", '{"transformer.lora_alpha": "many"}',
                                      '{"transformer.alpha_pattern": {"(": 2}}'])
def test_malformed_peft_metadata_is_a_model_file_error(pipe, tmp_path, metadata):
    tensors = {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 64),
               "transformer.x_embedder.lora_B.weight": torch.zeros(64, 2)}
    path = write(tensors, tmp_path / "meta.safetensors", {"lora_adapter_metadata": metadata})
    with pytest.raises(ModelFileError, match="malformed lora_adapter_metadata metadata"):
        read_lora(path, pipe.transformer)


def test_text_encoder_parts_are_skipped_with_a_warning(pipe, tmp_path, caplog):
    tensors = {**kohya_qkv(64), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)}
    with caplog.at_level(logging.WARNING, logger="engine.lora"):
        lora = read_lora(write(tensors, tmp_path / "te.safetensors"), pipe.transformer)
    assert lora.modules == ["double_blocks.0.img_attn.qkv"]
    assert "1 text-encoder LoRA keys skipped" in caplog.text


# ------------------------------------------------------------------------------------------------ memory, streaming


def test_memory_plan_counts_the_runtime_lora_bytes(pipe, tmp_path):
    def plan():
        return plan_memory(pipe.transformer, width=64, height=64, budget=GiB, device="cuda")  # a named budget: no GPU

    tensors, _ = bfl_lora(pipe.transformer, "kohya", rank=4, seed=31)
    before = plan()
    pipe.load_lora(write(tensors, tmp_path / "a.safetensors"))
    try:
        after = plan()
        vec = nn.ModuleList(pipe.transformer.vec_modules())
        outside_vec = pipe.loras.nbytes - sum(m.lora_nbytes for m in vec.modules() if isinstance(m, LoRALinear))
        by_name = {c.name: c.nbytes for c in after.components}
        assert by_name["LoRA factors, resident"] == outside_vec > 0
        assert after.peak - before.peak == outside_vec
        assert "LoRA factors, resident" in after.describe()
        pipe.lora_mode = "merge"
        assert "LoRA factors, resident" not in {c.name for c in plan().components}
    finally:
        pipe.unload_loras()
        pipe.lora_mode = "runtime"
    assert plan().peak == before.peak


def test_streamed_blocks_carry_their_loras(pipe, tmp_path, start_latents, monkeypatch):
    """Block streaming moves the LoRA factors with their blocks, and a weight change reaches the streamed copies."""
    tensors, _ = bfl_lora(pipe.transformer, "kohya", rank=4, seed=32)
    pipe.load_lora(write(tensors, tmp_path / "a.safetensors"), weight=0.5)
    try:
        resident_half = ours(pipe, start_latents)
        pipe.set_lora_weights(1.0)
        resident_full = ours(pipe, start_latents)
        plan = pipe.plan
        monkeypatch.setattr(pipe, "plan", lambda *a: dataclasses.replace(  # a tiny model fits: pretend it does not
            plan(*a), streamed_double=(0,), streamed_single=(0, 1)))
        assert torch.equal(ours(pipe, start_latents), resident_full)
        assert len(pipe._placement._blocks) == 3
        pipe.set_lora_weights(0.5)
        assert torch.equal(ours(pipe, start_latents), resident_half)
    finally:
        pipe.unload_loras()
        monkeypatch.undo()
        pipe._unplace()


def test_bench_pipeline_prints_the_lora_table(capsys):
    from bench.pipeline import main

    main(["--presets", "BF16", "--lora-presets", "BF16", "--steps", "2", "--lora-rounds", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and ("runtime" in line or "merge" in line
                                                                             or "none" in line)]
    assert [row.split("|")[1:3] for row in rows] == [[" 0 ", " none "], [" 1 ", " runtime "], [" 4 ", " runtime "],
                                                     [" 1 ", " merge "], [" 4 ", " merge "]]
    assert "rank-3 LoRAs on every block Linear" in out
