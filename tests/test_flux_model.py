"""flux_model.Flux against two independent oracles, with quantized weights, precomputed modulations and real shapes.

Oracle 1: the reference equations (black-forest-labs/flux layers.py / math.py) re-derived here as plain functions of
the state dict: RoPE as complex multiplication, attention as an explicit softmax, GELU and LayerNorm written out.
Oracle 2: diffusers' FluxTransformer2DModel with the same weights converted by diffusers' own BFL -> diffusers
converter.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from safetensors.torch import save_file

from engine import ModelFileError, load_flux
from flux_model import Flux, FluxConfig, Modulations
from kernels import QTensor, get_format
from kernels.quant_linear import QuantLinear
from tests.flux_fixtures import diffusers_state_dict, flux_shapes, is_block_weight, tiny_flux

TINY = dict(hidden=64, heads=2, depth=2, depth_single=2, context=32, vec=16)  # head dim 32, RoPE axes (4, 14, 14)
QUANT_TINY = dict(hidden=64, heads=2, depth=1, depth_single=1, context=32, vec=16)  # Triton interpreter: keep small
DEV = dict(hidden=3072, heads=24, depth=19, depth_single=38, context=4096, vec=768)


def random_flux(seed=0, guidance=True, **kwargs) -> dict[str, torch.Tensor]:
    """fp32 tiny Flux; QK-norm scales around 1 (not tiny_flux's ~0) so attention is far from uniform."""
    sd = tiny_flux(seed, dtype=torch.float32, guidance=guidance, **(kwargs or TINY))
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in sd.items():
        if name.endswith(".scale"):
            sd[name] = 1 + 0.5 * torch.randn(t.shape, generator=g)
        elif name.endswith(".weight"):
            sd[name] = t * 4  # std 0.2: activations of order 1 through every layer
    return sd


def inputs(seed=0, B=2, L_img=6, L_txt=4, context=32, vec=16, shared_ids=False):
    """img, img_ids, txt, txt_ids, timesteps, y, guidance. Ids are random integer positions on all three axes (BFL's
    sampler uses 0 for axis 0 and for text, which would leave parts of RoPE untested)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda L: torch.randint(0, 40, (1 if shared_ids else B, L, 3), generator=g).float().expand(B, L, 3)
    return dict(img=torch.randn(B, L_img, 64, generator=g), img_ids=ids(L_img),
                txt=torch.randn(B, L_txt, context, generator=g), txt_ids=ids(L_txt),
                timesteps=torch.tensor([0.25, 0.9])[:B], y=torch.randn(B, vec, generator=g),
                guidance=torch.tensor([3.5, 1.0])[:B])


def load_dense(sd, dtype=torch.float32) -> Flux:
    return Flux.from_state_dict(sd, dtype=dtype)


# ------------------------------------------------------------------------------------------------ oracle 1


def reference_forward(sd, img, img_ids, txt, txt_ids, timesteps, y, guidance, heads, axes=(4, 14, 14), theta=10_000):
    """Flux's equations over the state dict, written independently of flux_model (float64 throughout)."""
    sd = {k: v.double() for k, v in sd.items()}
    img, txt, y = img.double(), txt.double(), y.double()

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def silu(x):
        return x / (1 + torch.exp(-x))

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def layer_norm(x):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6)

    def rms_norm(x, scale):
        return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * scale

    def sinusoid(t):  # 256 channels: cos(1000 t f_i) then sin(1000 t f_i), f_i = 10000^(-i/128)
        f = torch.tensor([10_000 ** (-i / 128) for i in range(128)], dtype=torch.float64)
        a = 1000 * t.double()[:, None] * f
        return torch.cat([torch.cos(a), torch.sin(a)], -1)

    def embedder(x, name):
        return lin(silu(lin(x, f"{name}.in_layer")), f"{name}.out_layer")

    def rotate(x, ids):  # x (B, L, H, D): channel pairs (2j, 2j+1) as a complex number times e^{i pos f_j}
        angles = []
        for axis, d in enumerate(axes):
            f = torch.tensor([theta ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
            angles.append(ids[..., axis, None].double() * f)
        angles = torch.cat(angles, -1)  # (B, L, D/2)
        rot = torch.polar(torch.ones_like(angles), angles)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * rot[:, :, None]).reshape(x.shape)

    def joint_attention(q, k, v, ids):  # (B, L, H, D) -> (B, L, H*D)
        q, k = rotate(q, ids), rotate(k, ids)
        p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        out = torch.einsum("bhlm,bmhd->blhd", p, v)
        return out.reshape(*out.shape[:2], -1)

    def qkv_heads(x, name, norm):  # (B, L, 3*H*D) -> q, k, v (B, L, H, D), q and k RMS-normalized per head
        qkv = lin(x, name)
        q, k, v = qkv.reshape(*qkv.shape[:2], 3, heads, -1).unbind(2)
        return rms_norm(q, sd[f"{norm}.query_norm.scale"]), rms_norm(k, sd[f"{norm}.key_norm.scale"]), v

    vec = embedder(sinusoid(timesteps), "time_in") + embedder(y, "vector_in")
    if "guidance_in.in_layer.weight" in sd:
        vec = vec + embedder(sinusoid(guidance), "guidance_in")
    x, c = lin(img, "img_in"), lin(txt, "txt_in")
    ids = torch.cat([txt_ids, img_ids], 1)
    n_txt = c.shape[1]

    i = 0
    while f"double_blocks.{i}.img_mod.lin.weight" in sd:
        b = f"double_blocks.{i}"
        m_img = lin(silu(vec), f"{b}.img_mod.lin")[:, None].chunk(6, -1)  # shift, scale, gate (attn), same (MLP)
        m_txt = lin(silu(vec), f"{b}.txt_mod.lin")[:, None].chunk(6, -1)
        qi, ki, vi = qkv_heads((1 + m_img[1]) * layer_norm(x) + m_img[0], f"{b}.img_attn.qkv", f"{b}.img_attn.norm")
        qt, kt, vt = qkv_heads((1 + m_txt[1]) * layer_norm(c) + m_txt[0], f"{b}.txt_attn.qkv", f"{b}.txt_attn.norm")
        a = joint_attention(torch.cat([qt, qi], 1), torch.cat([kt, ki], 1), torch.cat([vt, vi], 1), ids)
        x = x + m_img[2] * lin(a[:, n_txt:], f"{b}.img_attn.proj")
        x = x + m_img[5] * lin(gelu_tanh(lin((1 + m_img[4]) * layer_norm(x) + m_img[3], f"{b}.img_mlp.0")),
                               f"{b}.img_mlp.2")
        c = c + m_txt[2] * lin(a[:, :n_txt], f"{b}.txt_attn.proj")
        c = c + m_txt[5] * lin(gelu_tanh(lin((1 + m_txt[4]) * layer_norm(c) + m_txt[3], f"{b}.txt_mlp.0")),
                               f"{b}.txt_mlp.2")
        i += 1

    h = torch.cat([c, x], 1)
    hidden = h.shape[-1]
    i = 0
    while f"single_blocks.{i}.linear1.weight" in sd:
        b = f"single_blocks.{i}"
        shift, scale, gate = lin(silu(vec), f"{b}.modulation.lin")[:, None].chunk(3, -1)
        z = lin((1 + scale) * layer_norm(h) + shift, f"{b}.linear1")
        q, k, v = z[..., :3 * hidden].reshape(*z.shape[:2], 3, heads, -1).unbind(2)
        q, k = rms_norm(q, sd[f"{b}.norm.query_norm.scale"]), rms_norm(k, sd[f"{b}.norm.key_norm.scale"])
        a = joint_attention(q, k, v, ids)
        h = h + gate * lin(torch.cat([a, gelu_tanh(z[..., 3 * hidden:])], -1), f"{b}.linear2")
        i += 1

    shift, scale = lin(silu(vec), "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    return lin((1 + scale) * layer_norm(h[:, n_txt:]) + shift, "final_layer.linear")


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_matches_reference_equations(guidance):
    sd = random_flux(guidance=guidance)
    model = load_dense(sd)
    x = inputs()
    if not guidance:
        x["guidance"] = None
    with torch.no_grad():
        got = model(**x)
    want = reference_forward(sd, heads=2, **x).float()
    assert got.shape == (2, 6, 64) and got.dtype == torch.float32
    assert want.abs().max() > 1  # not a degenerate all-bias output
    # BFL evaluates the sinusoids (arguments up to 1000 t) and RoPE in float32, the oracle in float64: with these
    # weights that alone moves the output by ~3e-5 of its size (with those pieces in float64 too, by 7e-7)
    assert (got - want).norm() / want.norm() < 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # every input matters: a change in each moves the output
    for key, delta in [("timesteps", 0.01), ("y", 0.1), ("guidance", 0.5), ("txt_ids", 1.0), ("img_ids", 1.0)]:
        if x[key] is None:
            continue
        with torch.no_grad():
            moved = model(**(x | {key: x[key] + delta}))
        assert (moved - got).abs().max() > 1e-3, key


def test_bf16_close_to_fp32():
    sd = random_flux()
    x = inputs()
    with torch.no_grad():
        want = load_dense(sd)(**x)
        got = load_dense(sd, dtype=torch.bfloat16)(**x)  # inputs are cast to the model's dtype
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).norm() / want.norm() < 2e-2


def test_missing_guidance_is_an_error():
    with pytest.raises(ValueError, match="guidance"):
        load_dense(random_flux())(**(inputs() | {"guidance": None}))


# ------------------------------------------------------------------------------------------------ oracle 2


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_matches_diffusers(guidance):
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    sd = random_flux(guidance=guidance)
    theirs = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=None, num_layers=TINY["depth"],
                                    num_single_layers=TINY["depth_single"], attention_head_dim=32,
                                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                    guidance_embeds=guidance, axes_dims_rope=(4, 14, 14))
    theirs.load_state_dict(diffusers_state_dict(sd, 64, 256), strict=True)
    theirs.eval()
    x = inputs(shared_ids=True)  # diffusers takes one (L, 3) id table for the whole batch
    with torch.no_grad():
        ours = load_dense(sd)(**(x | ({} if guidance else {"guidance": None})))
        # diffusers multiplies timestep and guidance by 1000 itself, as BFL's embedding does: same t in [0, 1]
        want = theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                      timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                      guidance=x["guidance"] if guidance else None, return_dict=False)[0]
    assert want.abs().max() > 1
    # diffusers builds its RoPE table in float64, BFL (and we) in float32: differences of order 1e-6
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ quantized


def quantize_blocks(sd, fmt):
    """The published files' layout: 2-D block weights quantized (Q4_K where K allows its 256-wide blocks, else
    Q8_0), everything else dense."""
    out = {}
    for name, t in sd.items():
        if is_block_weight(name):
            out[name] = QTensor.quantize(t, fmt if t.shape[1] % get_format(fmt).block_size == 0 else "Q8_0")
        else:
            out[name] = t
    return out


def dequantized(sd):
    return {k: v.dequantize(torch.float32) if isinstance(v, QTensor) else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def quant_q8():
    sd = quantize_blocks(random_flux(seed=3, **QUANT_TINY), "Q8_0")
    return sd, Flux.from_state_dict(sd, dtype=torch.float32), load_dense(dequantized(sd))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_quantized_equals_dequantized_dense(fmt, quant_q8):
    if fmt == "Q8_0":
        sd, model, dense = quant_q8
    else:
        sd = quantize_blocks(random_flux(seed=4, **QUANT_TINY), fmt)
        model, dense = Flux.from_state_dict(sd, dtype=torch.float32), load_dense(dequantized(sd))
        assert {v.format for v in sd.values() if isinstance(v, QTensor)} == {"Q4_K", "Q8_0"}
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {n[:-len(".weight")] for n, v in sd.items() if isinstance(v, QTensor)}
    assert len(quantized) == 13  # 2 x 5 per double block + 3 per single block
    assert all(model.get_submodule(n).weight.raw.data_ptr() == sd[f"{n}.weight"].raw.data_ptr()
               for n in quantized)  # the given bytes, not a copy
    x = inputs(seed=5, L_img=4, L_txt=3)
    with torch.no_grad():
        got, want = model(**x), dense(**x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_quantized_bf16_forward(quant_q8):
    """bf16, the default dtype: with quantized Linears (Triton's interpreter without a GPU) as with dense ones."""
    sd, _, dense = quant_q8
    model = Flux.from_state_dict(sd, dtype=torch.bfloat16)
    x = inputs(seed=5, L_img=4, L_txt=3)
    with torch.no_grad():
        got, want = model(**x), dense(**x)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.double() - want.double()).norm() / want.double().norm() < 0.05


def test_quantized_modulation_precompute(quant_q8):
    _, model, dense = quant_q8
    x = inputs(seed=6, L_img=4, L_txt=3)
    steps = torch.tensor([1.0, 0.5, 0.1])
    with torch.no_grad():
        mods = model.precompute_modulations(steps, x["y"], x["guidance"])
        for i, t in enumerate(steps):
            want = dense(**(x | {"timesteps": t.expand(2)}))
            got = model(**x, modulations=mods, step=i)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ modulations


def test_precomputed_modulations_equal_per_step():
    model = load_dense(random_flux())
    x = inputs()
    steps = torch.linspace(1, 0, 5)[:-1]
    with torch.no_grad():
        want = [model(**(x | {"timesteps": t.expand(2)})) for t in steps]
        mods = model.precompute_modulations(steps, x["y"], x["guidance"])
        assert isinstance(mods, Modulations) and mods.num_steps == 4
        assert mods.double_img[0].shape == (4, 2, 6 * 64) and mods.single[1].shape == (4, 2, 3 * 64)
        assert mods.final.shape == (4, 2, 2 * 64)
        for i in range(4):
            torch.testing.assert_close(model(**x, modulations=mods, step=i), want[i], rtol=1e-4, atol=1e-4)

        n_params = sum(p.numel() for p in model.parameters())
        moved = model.offload_modulation_weights("meta")
        left = sum(p.numel() for p in model.parameters() if not p.is_meta)
        assert moved == (n_params - left) * 4
        assert model.double_blocks[0].img_mod.lin.weight.is_meta and model.time_in.in_layer.weight.is_meta
        assert not model.img_in.weight.is_meta and not model.double_blocks[0].img_attn.qkv.weight.is_meta
        for i in range(4):  # denoising needs nothing that was offloaded
            torch.testing.assert_close(model(**x, modulations=mods, step=i), want[i], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="offloaded"):
            model(**x)
        with pytest.raises(ValueError, match="step"):
            model(**x, modulations=mods, step=4)


def test_precompute_without_guidance():
    model = load_dense(random_flux(guidance=False))
    x = inputs() | {"guidance": None}
    steps = torch.tensor([1.0, 0.75])
    with torch.no_grad():
        mods = model.precompute_modulations(steps, x["y"])
        for i, t in enumerate(steps):
            torch.testing.assert_close(model(**x, modulations=mods, step=i),
                                       model(**(x | {"timesteps": t.expand(2)})), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ real shapes


def test_flux_dev_and_schnell_shapes_on_meta():
    with torch.device("meta"):
        dev = Flux(FluxConfig.dev())
        schnell = Flux(FluxConfig.schnell())
    shapes = {name: tuple(p.shape) for name, p in dev.named_parameters()}
    assert shapes == flux_shapes(**DEV)
    assert {name: tuple(p.shape) for name, p in schnell.named_parameters()} == flux_shapes(**DEV, guidance=False)
    assert FluxConfig.from_state_dict({n: torch.empty(s, device="meta") for n, s in shapes.items()}) == FluxConfig.dev()

    total = sum(p.numel() for p in dev.parameters())
    assert abs(total / 1e9 - 11.90) < 0.01
    in_blocks = sum(p.numel() for n, p in dev.named_parameters() if n.endswith(("_mod.lin.weight", "_mod.lin.bias",
                                                                                "modulation.lin.weight",
                                                                                "modulation.lin.bias")))
    adaln = in_blocks + sum(p.numel() for p in dev.final_layer.adaLN_modulation.parameters())
    # 3.23B (27.1%) in the blocks' adaLN Linears; 3.25B (27.3%) with the final layer's
    assert abs(in_blocks / total - 0.271) < 0.001 and abs(in_blocks / 1e9 - 3.23) < 0.005
    assert abs(adaln / total - 0.273) < 0.001
    vec_only = sum(p.numel() for m in dev.vec_modules() for p in m.parameters())
    assert adaln < vec_only < adaln + 0.04e9  # + time_in, vector_in, guidance_in


# ------------------------------------------------------------------------------------------------ from files


def test_from_gguf_file(tmp_path):
    from engine.checkpoints import load_checkpoint
    from tests.test_checkpoints import write_city96_gguf

    sd = random_flux(seed=7, **QUANT_TINY)
    path = tmp_path / "flux-Q8_0.gguf"
    write_city96_gguf(path, sd, "Q8_0", "F16")
    model = load_flux(path, dtype=torch.float32)
    loaded = load_checkpoint(path)
    dense = load_dense(dequantized({k: v if isinstance(v, QTensor) else v.float() for k, v in loaded.items()}))
    assert isinstance(model.single_blocks[0].linear1, QuantLinear)
    assert model.single_blocks[0].linear1.weight.format == "Q8_0"
    assert isinstance(model.img_in, torch.nn.Linear) and model.img_in.weight.dtype == torch.float32  # F16 -> fp32
    # from a loaded state dict the QTensors are used in place: the mmapped file bytes, no copy
    again = Flux.from_state_dict(loaded, dtype=torch.float32)
    assert again.double_blocks[0].img_mlp[2].weight.raw.data_ptr() == \
        loaded["double_blocks.0.img_mlp.2.weight"].raw.data_ptr()
    x = inputs(seed=8, L_img=4, L_txt=3)
    with torch.no_grad():
        torch.testing.assert_close(model(**x), dense(**x), rtol=1e-4, atol=1e-4)


def test_from_safetensors_file(tmp_path):
    sd = tiny_flux(seed=9, dtype=torch.bfloat16, guidance=False, **TINY)
    path = tmp_path / "flux.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(path))  # ComfyUI prefix
    model = load_flux(path)
    assert model.dtype == torch.bfloat16 and not model.params.guidance_embed
    state = model.state_dict()
    assert set(state) == set(sd) and all(torch.equal(state[k], sd[k]) for k in sd)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        out = model(**(inputs() | {"guidance": None}))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_from_state_dict_errors():
    sd = random_flux(**QUANT_TINY)
    with pytest.raises(ValueError, match=r"1 missing: single_blocks\.0\.norm\.key_norm\.scale"):
        Flux.from_state_dict({k: v for k, v in sd.items() if k != "single_blocks.0.norm.key_norm.scale"})
    with pytest.raises(ValueError, match=r"2 unexpected: .*lora_down\.weight"):
        Flux.from_state_dict(sd | {"double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 64),
                                   "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"txt_mlp\.0\.weight: shape \(256, 32\)"):
        Flux.from_state_dict(sd | {"double_blocks.0.txt_mlp.0.weight": QTensor.quantize(torch.zeros(256, 32), "Q8_0")})
    with pytest.raises(ValueError, match=r"img_mlp\.0\.bias: shape \(255,\)"):
        Flux.from_state_dict(sd | {"double_blocks.0.img_mlp.0.bias": torch.zeros(255)})


def test_load_flux_names_the_file(tmp_path):
    """A file whose tensors do not fit the model: flux_model's ValueError becomes a ModelFileError naming the file."""
    sd = tiny_flux(seed=9, dtype=torch.bfloat16, guidance=False, **TINY)
    sd["double_blocks.0.img_mlp.0.bias"] = torch.zeros(255, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "bad-flux.safetensors"))
    with pytest.raises(ModelFileError, match=r"bad-flux\.safetensors: double_blocks\.0\.img_mlp\.0\.bias: shape"):
        load_flux(tmp_path / "bad-flux.safetensors")


def test_quantized_bytes_are_buffers():
    """QuantLinear's bytes are a registered buffer: state_dict, buffers(), .to() and the offload count see them."""
    sd = quantize_blocks(random_flux(seed=3, **QUANT_TINY), "Q8_0")
    model = Flux.from_state_dict(sd, dtype=torch.float32)
    qkv = model.double_blocks[0].img_attn.qkv
    assert model.state_dict()["double_blocks.0.img_attn.qkv.raw"].data_ptr() == \
        sd["double_blocks.0.img_attn.qkv.weight"].raw.data_ptr()
    assert sum(b.nbytes for b in model.buffers()) == sum(v.nbytes for v in sd.values() if isinstance(v, QTensor))

    fresh = QuantLinear(QTensor.quantize(torch.randn(8, 32), "Q8_0"))
    moved_away, view = weakref.ref(fresh.raw), fresh.weight
    del view
    fresh.to("meta")  # nothing keeps the old bytes alive
    assert moved_away() is None and fresh.weight.device.type == "meta"
    half = QuantLinear(qkv.weight, qkv.bias).to(torch.float16)  # dtype casts leave the quantized bytes alone
    assert half.raw.dtype == torch.uint8 and half.bias.dtype == torch.float16 and half.weight.format == "Q8_0"
    vec_prefixes = tuple(f"{name}." for name, m in model.named_modules() if m in model.vec_modules())
    expected = sum(v.nbytes if isinstance(v, QTensor) else v.numel() * 4 for k, v in sd.items()
                   if k.startswith(vec_prefixes))
    assert model.offload_modulation_weights("meta") == expected
    lin = model.double_blocks[0].img_mod.lin
    assert isinstance(lin, QuantLinear) and lin.raw.is_meta and lin.weight.device.type == "meta"
    assert not qkv.raw.is_meta and qkv.weight.raw.data_ptr() == sd["double_blocks.0.img_attn.qkv.weight"].raw.data_ptr()


def test_load_flux_keeps_a_gguf_mapped(tmp_path):
    """Building the model from a GGUF copies no quantized bytes: resident memory grows by far less than the file."""
    from tests.test_checkpoints import rss_bytes, write_city96_gguf

    path = tmp_path / "flux.gguf"
    write_city96_gguf(path, tiny_flux(hidden=512, heads=4, depth=2, depth_single=4, context=256, vec=256), "Q8_0",
                      "F16")
    size = path.stat().st_size
    before = rss_bytes()
    model = load_flux(path, device="cpu", dtype=torch.bfloat16)
    assert rss_bytes() - before < size / 4
    assert isinstance(model.double_blocks[0].img_attn.qkv, QuantLinear)
