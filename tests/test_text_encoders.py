"""engine.text_encoders against transformers' own CLIPTextModel / T5EncoderModel and Hugging Face tokenizers, for every
file layout, written here from tiny random models (GGUF through gguf's writer, quantized with our codecs)."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ModelFileError
from kernels import reference
from kernels.formats import get_format
from kernels.qtensor import QTensor
from engine.text_encoders import TextConditioner, load_clip, load_t5, save_t5_gguf
from engine.text_encoders.gguf_t5 import tokenizer_from_gguf
from tests.test_checkpoints import rss_bytes
from tests.text_encoder_fixtures import WORDS, tiny_clip, tiny_t5, train_clip_tokenizer, train_t5_tokenizer

T5_LEN = 24
PROMPTS = ["a red cat on a blue background", "", "photo of 東京 at night, 🙂 " * 6, "Straße  café\tnaïve ﬁ"]
# llama.cpp's T5 encoder names (gguf.constants.TENSOR_NAMES) -> transformers', written out here independently
GGUF_TO_HF = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm",
              "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k",
              "attn_v": "layer.0.SelfAttention.v", "attn_o": "layer.0.SelfAttention.o",
              "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias", "attn_norm": "layer.0.layer_norm",
              "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_up": "layer.1.DenseReluDense.wi_1",
              "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm"}


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """No test may find this machine's Hugging Face cache (or the user's prompt cache)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"t5": train_t5_tokenizer(root / "t5"), "clip": train_clip_tokenizer(root / "clip"),
            "t5_dir": root / "t5", "clip_dir": root / "clip"}


@pytest.fixture(scope="module")
def t5(tok):
    return tiny_t5(len(tok["t5"]))


@pytest.fixture(scope="module")
def t5_wide(tok):
    """Rows of 256 and 512: whole K-quant blocks."""
    return tiny_t5(len(tok["t5"]), seed=1, d_model=256, d_ff=512, layers=1)


@pytest.fixture(scope="module")
def clip(tok):
    return tiny_clip(len(tok["clip"]))


def t5_ids(tok, prompts=PROMPTS, max_length=T5_LEN):
    return tok["t5"](prompts, truncation=True, max_length=max_length, padding="max_length",
                     return_tensors="pt").input_ids


def clip_ids(tok, prompts=PROMPTS):
    return tok["clip"](prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt").input_ids


@torch.no_grad()
def t5_reference(model, tok, weights=None):
    """transformers' T5EncoderModel (optionally on other weights, e.g. the dequantized ones), fp32."""
    if weights is not None:
        model = type(model)(model.config).eval()
        model.load_state_dict({**weights, "encoder.embed_tokens.weight": weights["shared.weight"]})
    return model(input_ids=t5_ids(tok), attention_mask=None).last_hidden_state


@torch.no_grad()
def clip_reference(model, tok, weights=None):
    if weights is not None:
        model = type(model)(model.config).eval()
        model.load_state_dict(weights, strict=False)
    return model(input_ids=clip_ids(tok), attention_mask=None).pooler_output


def assert_close(out, ref, rel=1e-5):
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = (out - ref).abs().max() / ref.abs().max()
    assert err <= rel, f"relative error {err:.2e}"


def state(model, dtype=torch.float32):
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()
            if k != "encoder.embed_tokens.weight"}


def fp8(weights: dict, scaled: bool) -> tuple[dict, dict]:
    """(file tensors, the values they decode to): 2-D weights and norms in float8_e4m3fn, per-tensor scales for
    the 2-D weights when `scaled` (as ComfyUI's *_fp8_e4m3fn_scaled files)."""
    stored, values = {}, {}
    for name, w in weights.items():
        scale = w.abs().max() / 448 if scaled and w.dim() == 2 else torch.tensor(1.0)
        q = (w / scale).to(torch.float8_e4m3fn)
        stored[name] = q
        values[name] = q.float() * scale
        if scaled and w.dim() == 2:
            stored[name.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1).float()
    if scaled:
        stored["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return stored, values


def city96_decoded(weights: dict, type: str) -> dict:
    """What a city96-layout GGUF of `type` decodes to, by the numpy ground truth (`kernels.reference`): 2-D weights
    in `type` (F16 where a row is not whole blocks, as llama.cpp falls back), norms and the relative bias F32."""
    block = get_format(type).block_size
    out = {}
    for name, w in weights.items():
        if w.dim() != 2 or "relative_attention_bias" in name:
            out[name] = w
        elif w.shape[-1] % block:
            out[name] = w.half().float()
        else:
            out[name] = torch.from_numpy(reference.dequantize(reference.quantize(w.numpy(), type), type))
    return out


# ---------------------------------------------------------------- tokenizer rebuilt from GGUF metadata


def varied_strings(n=240, seed=1):
    rng = random.Random(seed)
    odd = ["  ", "\t", "\n", " \n\t ", "   ", "ĀāĂ", "ǅ", "ｆｕｌｌｗｉｄｔｈ", "①②", "e\u0301", "</s>", "<pad>",
           "<extra_id_0>", "▁", "x" * 40, "…", "—", "🙂🙂", "\u200b", "a.b,c;d", "C++", "ÀÉÎÕÜ"]
    strings = ["", " ", "a", "  leading and trailing  ", "many     spaces", "\ttab\tand\nnewline\n"]
    while len(strings) < n:
        parts = [rng.choice(WORDS + odd) for _ in range(rng.randint(1, 60))]
        strings.append("".join(p + rng.choice(["", " ", "  ", "\t", "\n"]) for p in parts))
    return strings


def test_gguf_tokenizer_gives_hugging_face_ids(tok, t5, tmp_path):
    path = save_t5_gguf(tmp_path / "t5.gguf", t5, tok["t5"], type="F16")
    rebuilt = tokenizer_from_gguf(path)
    strings = varied_strings()
    assert len(strings) >= 200
    for s in strings:
        assert rebuilt(s).input_ids == tok["t5"](s).input_ids, repr(s)
    for max_length in (8, 77):  # over-long prompts truncate to max_length, ending with </s>
        ours = rebuilt(strings, truncation=True, max_length=max_length, padding="max_length").input_ids
        assert ours == tok["t5"](strings, truncation=True, max_length=max_length, padding="max_length").input_ids


# ---------------------------------------------------------------- T5 layouts


@pytest.mark.parametrize("type", ["F32", "F16", "Q8_0", "Q4_0", "Q5_1"])
def test_t5_gguf_equals_transformers_on_the_decoded_weights(tok, t5, tmp_path, type):
    path = save_t5_gguf(tmp_path / f"t5-{type}.gguf", t5, tok["t5"], type=type)
    encoder = load_t5(path, max_length=T5_LEN, dtype=torch.float32)  # tokenizer from the GGUF
    linear = encoder.model.encoder.block[0].layer[1].DenseReluDense.wi_0
    assert linear.weight.format == type
    assert_close(encoder.encode(PROMPTS), t5_reference(t5, tok, city96_decoded(state(t5), type)))


@pytest.mark.parametrize("type", ["Q4_K", "Q3_K"])  # Q6_K too, but its quantizer's first compile takes 17 s
def test_t5_gguf_k_quants(tok, t5_wide, tmp_path, type):
    path = save_t5_gguf(tmp_path / f"t5-{type}.gguf", t5_wide, tok["t5"], type=type)
    encoder = load_t5(path, max_length=T5_LEN, dtype=torch.float32)
    assert encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight.format == type
    assert_close(encoder.encode(PROMPTS), t5_reference(t5_wide, tok, city96_decoded(state(t5_wide), type)))


def test_t5_gguf_from_gguf_writer_with_orig_shape_and_explicit_tokenizer(tok, t5, tmp_path):
    """A file written straight with gguf's writer, as llama.cpp does, without a tokenizer; one tensor stored flat
    with ComfyUI-GGUF's orig_shape key."""
    from gguf import GGUFWriter

    weights = state(t5)
    path = tmp_path / "plain.gguf"
    writer = GGUFWriter(path, "t5encoder")
    pairs = [("token_embd", "shared.weight"), ("enc.output_norm", "encoder.final_layer_norm.weight")]
    pairs += [(f"enc.blk.{i}.{short}", f"encoder.block.{i}.{GGUF_TO_HF[short]}.weight")
              for i in range(2) for short in list(GGUF_TO_HF)[2:]]
    for stored, name in pairs:
        if name not in weights:
            continue  # the relative bias exists in block 0 only
        w = weights[name].numpy()
        if stored.endswith("attn_rel_b"):
            writer.add_array(f"comfy.gguf.orig_shape.{stored}.weight", list(w.shape))
            w = w.reshape(-1)
        writer.add_tensor(stored + ".weight", w.astype(np.float16) if w.ndim == 2 else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match="pass tokenizer="):
        load_t5(path, max_length=T5_LEN)
    encoder = load_t5(path, tokenizer=tok["t5_dir"], max_length=T5_LEN, dtype=torch.float32)
    assert_close(encoder.encode(PROMPTS), t5_reference(t5, tok, {k: v.half().float() if v.dim() == 2 and "relative" not in k else v for k, v in weights.items()}))


def test_t5_comfyui_fp16_single_file(tok, t5, tmp_path):
    weights = state(t5, torch.float16)
    save_file(weights, tmp_path / "t5xxl_fp16.safetensors")
    encoder = load_t5(tmp_path / "t5xxl_fp16.safetensors", tokenizer=tok["t5_dir"], max_length=T5_LEN,
                      dtype=torch.float32)
    assert_close(encoder.encode(PROMPTS), t5_reference(t5, tok, {k: v.float() for k, v in weights.items()}))


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_t5_comfyui_fp8(tok, t5, tmp_path, scaled):
    stored, values = fp8(state(t5), scaled)
    path = tmp_path / "t5xxl.safetensors"
    save_file(stored, path)
    encoder = load_t5(path, tokenizer=tok["t5_dir"], max_length=T5_LEN, dtype=torch.float32)
    assert encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight.format == "F8_E4M3"
    assert_close(encoder.encode(PROMPTS), t5_reference(t5, tok, values))


def write_diffusers(root, t5, clip, tok):
    """A FLUX.1 diffusers pipeline's text side: text_encoder/, text_encoder_2/ (sharded), tokenizer/, tokenizer_2/."""
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2", max_shard_size="40KB")
    tok["clip"].save_pretrained(root / "tokenizer")
    tok["t5"].save_pretrained(root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


@pytest.fixture(scope="module")
def diffusers_root(tmp_path_factory, t5, clip, tok):
    return write_diffusers(tmp_path_factory.mktemp("flux-diffusers"), t5, clip, tok)


def test_diffusers_folders(tok, t5, clip, diffusers_root):
    assert (diffusers_root / "text_encoder_2" / "model.safetensors.index.json").is_file()
    t5_ref, clip_ref = t5_reference(t5, tok), clip_reference(clip, tok)
    for path in (diffusers_root, diffusers_root / "text_encoder_2",
                 diffusers_root / "text_encoder_2" / "model.safetensors.index.json"):
        assert_close(load_t5(path, max_length=T5_LEN, dtype=torch.float32).encode(PROMPTS), t5_ref)
    for path in (diffusers_root, diffusers_root / "text_encoder"):
        assert_close(load_clip(path, dtype=torch.float32).encode(PROMPTS), clip_ref)


def test_hugging_face_cache_snapshot(tok, t5, clip, tmp_path, monkeypatch):
    """A repo id resolves to its snapshot in the local cache, offline; single files find tokenizers there too."""
    hub = tmp_path / "hub"
    repo = hub / "models--black-forest-labs--FLUX.1-dev"
    write_diffusers(repo / "snapshots" / "0123abcd", t5, clip, tok)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert_close(load_t5("black-forest-labs/FLUX.1-dev", max_length=T5_LEN, dtype=torch.float32).encode(PROMPTS),
                 t5_reference(t5, tok))
    save_file(state(clip), tmp_path / "clip_l.safetensors")
    assert_close(load_clip(tmp_path / "clip_l.safetensors", dtype=torch.float32).encode(PROMPTS),
                 clip_reference(clip, tok))
    with pytest.raises(ModelFileError, match="no snapshot"):
        load_t5("black-forest-labs/FLUX.1-schnell")


def test_all_in_one_checkpoint(tok, t5, clip, tmp_path):
    """ComfyUI's fp8 all-in-one layout: transformer, VAE and both encoders in one file (T5 in scaled fp8)."""
    t5_stored, t5_values = fp8(state(t5), scaled=True)
    tensors = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
               "vae.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}
    tensors.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_stored.items()})
    tensors.update({f"text_encoders.clip_l.transformer.text_model.{k}": v
                    for k, v in state(clip, torch.float16).items()})
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(tensors, path)
    encoder = load_t5(path, tokenizer=tok["t5_dir"], max_length=T5_LEN, dtype=torch.float32)
    assert_close(encoder.encode(PROMPTS), t5_reference(t5, tok, t5_values))
    clip_encoder = load_clip(path, tokenizer=tok["clip_dir"], dtype=torch.float32)
    assert_close(clip_encoder.encode(PROMPTS), clip_reference(clip, tok, {k: v.float() for k, v in
                                                                            state(clip, torch.float16).items()}))


def test_clip_comfyui_single_file(tok, clip, tmp_path):
    weights = {f"text_model.{k}": v for k, v in state(clip, torch.float16).items()}
    weights["text_projection.weight"] = torch.zeros(128, 128, dtype=torch.float16)  # ComfyUI's files carry it: unused
    save_file(weights, tmp_path / "clip_l.safetensors")
    encoder = load_clip(tmp_path / "clip_l.safetensors", tokenizer=tok["clip_dir"], dtype=torch.float32)
    assert (encoder.tokenize(PROMPTS) == clip_ids(tok)).all()
    out = encoder.encode(PROMPTS)
    assert out.shape == (len(PROMPTS), 128)
    assert_close(out, clip_reference(clip, tok, {k: v.float() for k, v in state(clip, torch.float16).items()}))


def test_reduced_precision_compute(tok, t5, tmp_path):
    """bf16 compute, and fp16 with T5's `wo` in float32 (its output overflows fp16 in the real model)."""
    path = save_t5_gguf(tmp_path / "t5.gguf", t5, tok["t5"], type="Q8_0")
    ref = t5_reference(t5, tok, city96_decoded(state(t5), "Q8_0"))
    for dtype in (torch.bfloat16, torch.float16):
        encoder = load_t5(path, max_length=T5_LEN, dtype=dtype)
        out = encoder.encode(PROMPTS)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() / ref.abs().max() < 3e-2
    assert encoder.model.encoder.block[0].layer[1].DenseReluDense.wo.matmul_dtype == torch.float32


def test_quantized_t5_stays_memory_mapped(tok, tmp_path):
    """Loading a Q8_0 T5 grows RSS by less than a quarter of the file: weights are views of the file map."""
    from transformers import T5EncoderModel

    from tests.text_encoder_fixtures import t5_config

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5EncoderModel(t5_config(len(tok["t5"]), 512, 2048, 8, 8)).state_dict().items()
                  if k != "encoder.embed_tokens.weight"}
    slab = QTensor.quantize(torch.randn(64, 2048) * 0.05, "Q8_0")  # tiled: quantizing 35 MB of weights takes 6 s

    def q8(shape):
        rows = slab.raw[:, :get_format("Q8_0").row_bytes(shape[1])].repeat(-(-shape[0] // 64), 1)[:shape[0]]
        return QTensor(rows.contiguous(), "Q8_0", shape)

    weights = {k: q8(s) if len(s) == 2 and "relative" not in k else torch.rand(s) for k, s in shapes.items()}
    path = save_t5_gguf(tmp_path / "t5-q8.gguf", weights, tok["t5"], type="Q8_0")
    del weights
    size = path.stat().st_size
    assert size > 30e6
    before = rss_bytes()
    encoder = load_t5(path, max_length=T5_LEN, dtype=torch.float32)
    assert rss_bytes() - before < size / 4, "loading copied the weights"
    assert encoder.encode(["a red cat"]).shape == (1, T5_LEN, 512)


# ---------------------------------------------------------------- bad input


def test_bad_files_raise_one_model_file_error(tok, t5, clip, tmp_path):
    from gguf import GGUFWriter

    flux_gguf = tmp_path / "flux.gguf"
    writer = GGUFWriter(flux_gguf, "flux")
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((24, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dit = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8)}, dit)
    incomplete = tmp_path / "t5-incomplete.safetensors"
    save_file({k: v for k, v in state(t5).items() if "block.1.layer.1" not in k}, incomplete)
    t5_file = tmp_path / "t5xxl_fp16.safetensors"
    save_file(state(t5, torch.float16), t5_file)
    t5_gguf = save_t5_gguf(tmp_path / "t5.gguf", t5, tok["t5"], type="Q8_0")
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    cases = [
        (lambda: load_t5(flux_gguf), flux_gguf, "architecture 'flux' is not a T5"),
        (lambda: load_t5(dit, tokenizer=tok["t5_dir"]), dit, "not a T5 text encoder.*no text encoder"),
        (lambda: load_clip(t5_file, tokenizer=tok["clip_dir"]), t5_file, "not a CLIP.*looks like a T5"),
        (lambda: load_t5(incomplete, tokenizer=tok["t5_dir"]), incomplete, "missing: encoder.block.1.layer.1"),
        (lambda: load_t5(t5_file), t5_file, "no T5 tokenizer found.*pass tokenizer="),
        (lambda: load_t5(t5_file, tokenizer=tmp_path), tmp_path, "not a T5 tokenizer"),
        (lambda: load_clip(t5_gguf), t5_gguf, "only T5 encoders are read from GGUF"),
        (lambda: load_t5(pickle), pickle, "pickle"),
        (lambda: load_t5(tmp_path / "nowhere.safetensors"), tmp_path / "nowhere.safetensors", "no such file"),
    ]
    for load, path, problem in cases:
        with pytest.raises(ModelFileError, match=problem) as info:
            load()
        assert info.value.path == str(path)


# ---------------------------------------------------------------- conditioner and prompt cache


def test_conditioner_caches_prompts_and_loads_lazily(tok, t5, clip, diffusers_root, tmp_path, monkeypatch):
    import engine.text_encoders.conditioner as conditioner_module

    cache_dir = tmp_path / "prompts"
    make = lambda **kw: TextConditioner(diffusers_root, diffusers_root, max_length=T5_LEN, dtype=torch.float32,
                                        cache_dir=cache_dir, **kw)
    first = make()
    txt, vec = first.encode(PROMPTS)
    assert_close(txt, t5_reference(t5, tok))
    assert_close(vec, clip_reference(clip, tok))
    assert len(list(cache_dir.glob("*.safetensors"))) == 2 * len(PROMPTS)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached prompt loaded an encoder")

    monkeypatch.setattr(conditioner_module, "load_t5", refuse)
    monkeypatch.setattr(conditioner_module, "load_clip", refuse)
    second = make()  # a new process would see the same files on disk
    txt2, vec2 = second.encode(list(reversed(PROMPTS)))
    assert torch.equal(txt2, txt.flip(0)) and torch.equal(vec2, vec.flip(0))
    assert not second.encoders
    with pytest.raises(AssertionError, match="loaded an encoder"):
        second.encode(["a prompt never seen"])
    with pytest.raises(AssertionError, match="loaded an encoder"):  # another max_length is another key
        TextConditioner(diffusers_root, diffusers_root, max_length=T5_LEN + 1, dtype=torch.float32,
                        cache_dir=cache_dir).encode(PROMPTS[:1])
    monkeypatch.undo()

    uncached = make(cache=False)
    txt3, _ = uncached.encode(PROMPTS[:1])
    assert torch.equal(txt3, txt[:1]) and set(uncached.encoders) == {"t5", "clip"}
    uncached.release()
    assert not uncached.encoders


def test_default_cache_dir_follows_xdg(tmp_path):
    from engine.text_encoders.cache import default_cache_dir

    assert default_cache_dir() == tmp_path / "xdg-cache" / "flux-quant-engine" / "prompts"


# ---------------------------------------------------------------- GPU streaming


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_gpu_encode_equals_resident_and_frees_memory(tok, t5, tmp_path):
    path = save_t5_gguf(tmp_path / "t5.gguf", t5, tok["t5"], type="Q8_0")
    encoder = load_t5(path, max_length=T5_LEN, dtype=torch.float32)
    cpu = encoder.encode(PROMPTS)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    streamed = encoder.encode(PROMPTS, device="cuda")
    assert torch.cuda.memory_allocated() - before <= streamed.numel() * 4
    with encoder.resident("cuda"):
        resident = encoder.encode(PROMPTS, device="cuda")
    torch.testing.assert_close(streamed, resident)
    torch.testing.assert_close(streamed.cpu(), cpu, rtol=1e-3, atol=1e-3 * cpu.abs().max().item())
    assert encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight.device.type == "cpu"
