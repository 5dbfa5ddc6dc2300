"""Train the demo Flux that ships with the project: `python -m bench.train_demo [--workdir demo-train]`.

Stages, each resumable from its checkpoints in the work directory and deterministic by seed:
1. `text`: tokenizers trained on the grammar's words (a SentencePiece unigram model for T5, a byte-level BPE for
   CLIP) and tiny T5 / CLIP text encoders of the real architectures, pre-trained for a minute to parse the grammar,
   then frozen; every prompt of the grammar encoded once.
2. `ae`: a BFL-architecture autoencoder (16 latent channels, 8x downsampling) on the synthetic images.
3. `latents`: a fixed set of scenes encoded with the trained autoencoder.
4. `dit`: a BFL-architecture DiT (double and single stream blocks, 3-axis RoPE), rectified flow as Flux is trained:
   x_t = (1 - t) x_0 + t noise, the model predicts noise - x_0, t logit-normal; 10% of prompts are dropped (the
   empty prompt), so classifier-free guidance works at sampling time.
Then `python -m bench.export_demo` writes the shipped files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bench import demo_world
from engine.sampling import image_ids, pack
from flux_model import AutoEncoder, AutoEncoderParams, Flux, FluxConfig


@dataclass
class DemoConfig:
    seed: int = 0
    t5_max_length: int = 16  # the grammar's prompts are 8-10 T5 tokens
    clip_max_length: int = 77
    t5: dict = field(default_factory=lambda: dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                                                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                                  relative_attention_max_distance=128))
    clip: dict = field(default_factory=lambda: dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                    num_attention_heads=1, max_position_embeddings=77,
                                                    hidden_act="quick_gelu", eos_token_id=2))
    ae: dict = field(default_factory=lambda: dict(resolution=64, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1,
                                                  norm_groups=8))
    text_steps: int = 300
    text_lr: float = 3e-3
    ae_steps: int = 2400
    ae_batch: int = 16
    ae_lr: float = 1e-3
    ae_kl_weight: float = 1e-6
    ae_image_size: int = 64  # convolutional: trained at 64x64, it encodes the 128x128 images as well
    # hidden 256: the K-quant formats need rows of 256 (the quantization comparison runs on this model)
    dit: dict = field(default_factory=lambda: dict(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64,
                                                   hidden_size=256, mlp_ratio=4.0, num_heads=4, depth=2,
                                                   depth_single_blocks=2, axes_dim=[8, 28, 28], theta=10_000,
                                                   qkv_bias=True, guidance_embed=False))
    # Low resolution first, as Flux is trained: at 64x64 (16 image tokens) the model learns colors and layout but
    # not shapes, which live inside a token there. At 128x128 (64 tokens) with the object anywhere in the picture,
    # earlier runs drew blobs, often several (shape 0.3-0.4 even on training prompts): the model has to pick a place
    # while the image is mostly noise. So the 128x128 phase centres the object (within 3%), and shape is what the
    # prompt decides; stars take it longest. The whole run took 96 minutes on 2 cores (text 1, autoencoder 21,
    # latents 10, these phases 52, distillation 12); the distilled model scores background 1.00, color 1.00 and shape
    # 0.98 on the 112 held-out images.
    dit_phases: list = field(default_factory=lambda: [
        dict(name="64", image_size=64, centred=False, steps=5_000, batch=32, lr=5e-4, warmup=300, scenes=20_000),
        dict(name="128-centred", image_size=128, centred=True, steps=11_000, batch=16, lr=3e-4, warmup=200,
             scenes=12_000)])
    dit_ema: float = 0.999
    # Guidance distillation, as FLUX.1-dev was made: a student with the guidance embedding learns the teacher's
    # classifier-free-guided prediction at a guidance scale drawn from `guidance`, so one pass per step replaces two.
    distill: dict = field(default_factory=lambda: dict(steps=2_000, batch=16, lr=2e-4, warmup=100,
                                                       guidance=[1.0, 5.0]))
    prompt_dropout: float = 0.1
    checkpoint_every: int = 200


# ------------------------------------------------------------------------------------------------ checkpoints


def save_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        extra: dict[str, torch.Tensor] | None = None) -> None:
    """Model, optimizer and step in one safetensors file (no pickle), written atomically."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optim.{index}.{slot}"] = torch.as_tensor(value).contiguous()
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v.detach().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "param_groups": json.dumps(state["param_groups"])})
    os.replace(tmp, path)


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, index, slot = k.split(".", 2)
            slots.setdefault(int(index), {})[slot] = v
    optimizer.load_state_dict({"state": slots, "param_groups": json.loads(metadata["param_groups"])})
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return int(metadata["step"]), extra


def cosine_lr(step: int, total: int, peak: float, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------ 1. text


def grammar_corpus(seed: int) -> list[str]:
    """Every prompt of the grammar, plus random word sequences over its vocabulary and a few more words (so each word
    becomes one piece and capitalised or reordered prompts still tokenize into known pieces)."""
    rng = np.random.default_rng(seed)
    words = [*demo_world.COLORS, *demo_world.SHAPES, "a", "an", "on", "background", "the", "small", "large", "left",
             "right", "top", "bottom", "at", "in", "of", "and", "with"]
    prompts = [demo_world.Scene(c, s, b, 0, 0, 0).prompt for c, s, b in demo_world.all_combinations()]
    noise = [" ".join(rng.choice(words, size=rng.integers(3, 10))) for _ in range(3000)]
    return prompts + [p.capitalize() for p in prompts] + noise


def _spm_precompiled_charsmap(model_proto: bytes) -> bytes:
    """`normalizer_spec.precompiled_charsmap` (ModelProto field 3, NormalizerSpec field 2) read straight from the
    protobuf wire format, so no protobuf package is needed."""

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(buf, i)
                yield number, None
            elif wire == 2:
                length, i = _varint(buf, i)
                yield number, buf[i:i + length]
                i += length
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
                yield number, None
            else:
                raise ValueError(f"unexpected protobuf wire type {wire}")

    normalizer = next(v for n, v in fields(model_proto) if n == 3)
    return next(v for n, v in fields(normalizer) if n == 2)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def train_t5_tokenizer(corpus: list[str], workdir: Path):
    """A SentencePiece unigram model (T5's kind: pad 0, eos 1, unk 2, NFKC charsmap) as a Hugging Face T5Tokenizer."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    text = workdir / "t5_corpus.txt"
    text.write_text("\n".join(corpus))
    prefix = workdir / "t5_spm"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=96, hard_vocab_limit=False,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, normalization_rule_name="nmt_nfkc", minloglevel=2,
                                   num_threads=1, seed_sentencepiece_size=10_000)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    charsmap = _spm_precompiled_charsmap(sp.serialized_model_proto())
    return T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=0, unk_id=2, eos_token="</s>",
                       pad_token="<pad>", unk_token="<unk>")


def train_clip_tokenizer(corpus: list[str]):
    """CLIP's kind of BPE: byte-level alphabet with and without the `</w>` end-of-word mark, learned merges, then
    <|startoftext|> and <|endoftext|> last, so the end token has the highest id (CLIP pools at argmax(ids))."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([line.lower() for line in corpus],
                            trainers.BpeTrainer(vocab_size=1000, end_of_word_suffix="</w>", show_progress=False))
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for piece in [*alphabet, *(a + "</w>" for a in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def pretrain_text_encoders(config: DemoConfig, t5, t5_tokenizer, clip, clip_tokenizer) -> None:
    """Teach the tiny encoders to parse the grammar before they are frozen, as FLUX's T5 and CLIP come pre-trained.

    Left random, T5's token outputs hardly depend on position: its "red" as the object's color and as the
    background's differ by 3% (the two colors' tokens by 130%), so the transformer had to tell "a red circle on a
    blue background" from its swap by the CLIP vector alone, and it swapped the two colors in 8% of held-out images.
    Here linear heads read the object color, shape and background from T5's mean token output and from CLIP's
    pooled output, over the training combinations only; the heads are thrown away."""
    combinations = demo_world.training_combinations()
    prompts = [demo_world.Scene(c, s, b, 0, 0, 0).prompt for c, s, b in combinations]
    colors, shapes = list(demo_world.COLORS), list(demo_world.SHAPES)
    targets = [torch.tensor([colors.index(c) for c, _, _ in combinations]),
               torch.tensor([shapes.index(s) for _, s, _ in combinations]),
               torch.tensor([colors.index(b) for _, _, b in combinations])]
    t5_ids = t5_tokenizer(prompts, padding="max_length", max_length=config.t5_max_length, truncation=True,
                          return_tensors="pt")
    clip_ids = clip_tokenizer(prompts, padding="max_length", max_length=config.clip_max_length, truncation=True,
                              return_tensors="pt").input_ids
    torch.manual_seed(config.seed + 6)
    sizes = (len(colors), len(shapes), len(colors))
    heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for width in (config.t5["d_model"],
                                                                         config.clip["hidden_size"]) for n in sizes)
    t5.train(), clip.train()
    optimizer = torch.optim.Adam([*t5.parameters(), *clip.parameters(), *heads.parameters()], lr=config.text_lr)
    mask = t5_ids.attention_mask[..., None].float()
    for _ in tqdm(range(config.text_steps), desc="text encoders", dynamic_ncols=True, mininterval=5):
        hidden = t5(input_ids=t5_ids.input_ids, attention_mask=t5_ids.attention_mask).last_hidden_state
        features = ((hidden * mask).sum(1) / mask.sum(1), clip(input_ids=clip_ids).pooler_output)
        loss = sum(F.cross_entropy(heads[3 * i + j](feature), targets[j])
                   for i, feature in enumerate(features) for j in range(3))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    t5.eval(), clip.eval()


def build_text(config: DemoConfig, workdir: Path) -> None:
    """Tokenizers, pre-trained frozen encoders (Hugging Face folders) and the embedding of every grammar prompt."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = workdir / "text"
    if (out / "embeddings.safetensors").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    corpus = grammar_corpus(config.seed)
    t5_tokenizer = train_t5_tokenizer(corpus, out)
    clip_tokenizer = train_clip_tokenizer(corpus)
    torch.manual_seed(config.seed + 1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **config.t5)).eval()
    torch.manual_seed(config.seed + 2)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), bos_token_id=len(clip_tokenizer) - 2,
                                        pad_token_id=len(clip_tokenizer) - 1, **config.clip)).eval()
    for name, tokenizer in (("t5", t5_tokenizer), ("clip", clip_tokenizer)):
        tokenizer.save_pretrained(out / f"{name}_tokenizer")  # before a call with padding, which the file would keep
    pretrain_text_encoders(config, t5, t5_tokenizer, clip, clip_tokenizer)
    for name, model in (("t5", t5), ("clip", clip)):
        model.save_pretrained(out / name)
    prompts = [""] + [demo_world.Scene(c, s, b, 0, 0, 0).prompt for c, s, b in demo_world.all_combinations()]
    with torch.no_grad():
        ids = t5_tokenizer(prompts, padding="max_length", max_length=config.t5_max_length, truncation=True,
                           return_tensors="pt").input_ids
        txt = t5(input_ids=ids).last_hidden_state
        ids = clip_tokenizer(prompts, padding="max_length", max_length=config.clip_max_length, truncation=True,
                             return_tensors="pt").input_ids
        vec = clip(input_ids=ids).pooler_output
    save_file({"txt": txt.contiguous(), "vec": vec.contiguous()}, str(out / "embeddings.safetensors"),
              metadata={"prompts": json.dumps(prompts)})


def load_embeddings(workdir: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    from safetensors import safe_open

    path = workdir / "text" / "embeddings.safetensors"
    with safe_open(str(path), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    tensors = load_file(str(path))
    return tensors["txt"], tensors["vec"], {p: i for i, p in enumerate(prompts)}


# ------------------------------------------------------------------------------------------------ 2. autoencoder


def ae_params(config: DemoConfig) -> AutoEncoderParams:
    return AutoEncoderParams(**config.ae)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


def train_autoencoder(config: DemoConfig, workdir: Path) -> None:
    final = workdir / "ae.safetensors"
    if final.exists():
        return
    torch.manual_seed(config.seed + 3)
    ae = AutoEncoder(ae_params(config)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(ae.parameters(), lr=config.ae_lr)
    state_path = workdir / "ae-state.safetensors"
    step = load_training_state(state_path, ae, optimizer)[0] if state_path.exists() else 0
    combinations = demo_world.training_combinations()

    def loss_fn(x, noise):
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        z = mean + noise * torch.exp(0.5 * logvar.clamp(-30, 20))  # decode a posterior sample, as LDM trains
        y = ae.decoder(z)
        recon = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
        return recon + config.ae_kl_weight * kl_divergence(mean, logvar), recon

    compiled = torch.compile(loss_fn)
    bar = tqdm(total=config.ae_steps, initial=step, desc="autoencoder", dynamic_ncols=True)
    while step < config.ae_steps:
        rng = np.random.default_rng([config.seed, 1, step])
        _, images = demo_world.sample_batch(rng, config.ae_batch, combinations, config.ae_image_size)
        x = torch.from_numpy(images).to(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        side = config.ae_image_size // ae.downscale
        noise = torch.randn(config.ae_batch, ae.params.z_channels, side, side, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.ae_steps, config.ae_lr)
        loss, recon = compiled(x, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{10 * math.log10(4 / max(recon.item(), 1e-10)):.1f}")
        if step % config.checkpoint_every == 0 or step == config.ae_steps:
            save_training_state(state_path, ae, optimizer, step)
    bar.close()
    write_autoencoder(ae, config, workdir, final)


@torch.no_grad()
def write_autoencoder(ae: AutoEncoder, config: DemoConfig, workdir: Path, path: Path) -> None:
    """BFL-named `ae.safetensors`, with the latent scale and shift measured on 2048 training images (FLUX's 0.3611 /
    0.1159 were measured the same way on its data) and the GroupNorm group count in the metadata."""
    ae.eval()
    rng = np.random.default_rng([config.seed, 2])
    _, images = demo_world.sample_batch(rng, 2048, demo_world.training_combinations(), config.ae_image_size)
    means = torch.cat([ae.encoder(torch.from_numpy(images[i:i + 256])).chunk(2, dim=1)[0] for i in range(0, 2048, 256)])
    shift, scale = means.mean().item(), 1.0 / means.std().item()
    tensors = {k: v.contiguous() for k, v in ae.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"norm_groups": str(config.ae["norm_groups"]), "scale_factor": f"{scale:.6f}",
                                           "shift_factor": f"{shift:.6f}"})
    os.replace(tmp, path)


def load_trained_autoencoder(config: DemoConfig, workdir: Path) -> AutoEncoder:
    from safetensors import safe_open

    path = workdir / "ae.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    params = ae_params(config)
    params.scale_factor, params.shift_factor = float(metadata["scale_factor"]), float(metadata["shift_factor"])
    ae = AutoEncoder(params)
    ae.load_state_dict(load_file(str(path)))
    return ae.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ 3. latents


def latents_path(workdir: Path, phase: dict) -> Path:
    return workdir / f"latents-{phase['name']}.safetensors"


@torch.no_grad()
def encode_scenes(config: DemoConfig, workdir: Path) -> None:
    """For each transformer phase, its scenes at its resolution, encoded once by the trained autoencoder."""
    ae = load_trained_autoencoder(config, workdir)
    _, _, prompt_index = load_embeddings(workdir)
    combinations = demo_world.training_combinations()
    for i, phase in enumerate(config.dit_phases):
        path = latents_path(workdir, phase)
        if path.exists():
            continue
        rng = np.random.default_rng([config.seed, 3] + ([] if i == 0 else [phase["image_size"]] * i))
        latents, prompts = [], []
        for _ in tqdm(range(0, phase["scenes"], 250), desc=f"encoding {phase['name']} scenes", dynamic_ncols=True):
            scenes, images = demo_world.sample_batch(rng, 250, combinations, phase["image_size"], phase["centred"])
            latents.append(ae.encode(torch.from_numpy(images)))
            prompts += [prompt_index[s.prompt] for s in scenes]
        tmp = path.with_suffix(".tmp")
        save_file({"latents": torch.cat(latents).contiguous(), "prompt": torch.tensor(prompts)}, str(tmp))
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ 4. transformer


def phase_weights(workdir: Path, phase: dict) -> Path:
    return workdir / f"flux-demo-{phase['name']}.safetensors"


def distilled_weights(workdir: Path) -> Path:
    """The shipped transformer."""
    return workdir / "flux-demo-distilled.safetensors"


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def train_loop(config: DemoConfig, workdir: Path, name: str, model: Flux, schedule: dict, loss_fn, batch_fn,
               final: Path) -> None:
    """AdamW with warm-up and cosine decay, gradient clipping and an EMA of the weights, bf16 matmuls (1.2x faster
    than fp32 on a CPU with avx512_bf16, the same elsewhere); resumable from
    `{name}-state.safetensors`; writes the EMA weights to `final`. `batch_fn(step, generator)` returns the arguments
    of `loss_fn`."""
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=schedule["lr"],
                                  weight_decay=0.01)
    state_path = workdir / f"{name}-state.safetensors"
    step = 0
    if state_path.exists():
        step, extra = load_training_state(state_path, model, optimizer)
        ema = {k[4:]: v for k, v in extra.items() if k.startswith("ema.")}
    compiled = torch.compile(loss_fn)
    bar = tqdm(total=schedule["steps"], initial=step, desc=name, dynamic_ncols=True, mininterval=10)
    smoothed = None
    while step < schedule["steps"]:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, schedule["steps"], schedule["lr"], warmup=schedule["warmup"])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # weights, gradients, optimizer and EMA stay fp32
            loss = compiled(*batch_fn(step, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - config.dit_ema)
        step += 1
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.update()
        bar.set_postfix(loss=f"{smoothed:.4f}")
        if step % config.checkpoint_every == 0 or step == schedule["steps"]:
            save_training_state(state_path, model, optimizer, step, {f"ema.{k}": v for k, v in ema.items()})
            _save_weights(ema, workdir / f"{name}-ema-latest.safetensors")
    bar.close()
    _save_weights(ema, final)


def rectified_flow_batch(config: DemoConfig, latents: torch.Tensor, prompts: torch.Tensor, batch: int,
                         generator: torch.Generator, empty: int):
    """Packed clean latents, their prompts (`prompt_dropout` of them replaced by the empty prompt), t drawn
    logit-normal as in SD3 / Flux, and the noise."""
    index = torch.randint(latents.shape[0], (batch,), generator=generator)
    x0 = pack(latents[index])
    prompt = prompts[index].clone()
    prompt[torch.rand(batch, generator=generator) < config.prompt_dropout] = empty
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    return x0, noise, t, prompt


def train_transformer(config: DemoConfig, workdir: Path) -> None:
    """Rectified flow, x_t = (1 - t) x_0 + t noise, the model predicts noise - x_0; one phase per resolution, each
    starting from the previous phase's EMA weights."""
    txt_table, vec_table, prompt_index = load_embeddings(workdir)
    previous = None
    for phase in config.dit_phases:
        final = phase_weights(workdir, phase)
        if not final.exists():
            data = load_file(str(latents_path(workdir, phase)))
            latents, prompts = data["latents"], data["prompt"]
            torch.manual_seed(config.seed + 4)
            model = Flux(FluxConfig(**config.dit)).train()
            if previous is not None:
                model.load_state_dict(load_file(str(previous)))
            h, w = latents.shape[2:]
            img_ids = image_ids(phase["batch"], h, w)
            txt_ids = torch.zeros(phase["batch"], config.t5_max_length, 3)

            def loss_fn(x0, noise, t, prompt):
                x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
                pred = model(x_t, img_ids, txt_table[prompt], txt_ids, t, vec_table[prompt])
                return F.mse_loss(pred.float(), noise - x0)

            def batch_fn(step, generator):
                return rectified_flow_batch(config, latents, prompts, phase["batch"], generator, prompt_index[""])

            train_loop(config, workdir, f"dit-{phase['name']}", model, phase, loss_fn, batch_fn, final)
        previous = final


def distill_guidance(config: DemoConfig, workdir: Path) -> None:
    """The student (the teacher plus Flux-dev's guidance embedding, whose output layer starts at zero so the student
    starts as the teacher) learns v_uncond + g (v_cond - v_uncond) of the frozen teacher at the last resolution."""
    final = distilled_weights(workdir)
    if final.exists():
        return
    txt_table, vec_table, prompt_index = load_embeddings(workdir)
    phase = config.dit_phases[-1]
    schedule = config.distill
    data = load_file(str(latents_path(workdir, phase)))
    latents, prompts = data["latents"], data["prompt"]
    weights = load_file(str(phase_weights(workdir, phase)))
    teacher = Flux(FluxConfig(**config.dit)).eval().requires_grad_(False)
    teacher.load_state_dict(weights)
    torch.manual_seed(config.seed + 5)
    student = Flux(FluxConfig(**{**config.dit, "guidance_embed": True})).train()
    missing = student.load_state_dict(weights, strict=False).missing_keys
    assert all(k.startswith("guidance_in.") for k in missing), missing
    torch.nn.init.zeros_(student.guidance_in.out_layer.weight)
    torch.nn.init.zeros_(student.guidance_in.out_layer.bias)
    batch = schedule["batch"]
    h, w = latents.shape[2:]
    img_ids = image_ids(batch, h, w)
    txt_ids = torch.zeros(batch, config.t5_max_length, 3)
    empty = torch.full((batch,), prompt_index[""])
    low, high = schedule["guidance"]

    def loss_fn(x0, noise, t, prompt, guidance):
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        with torch.no_grad():
            both = teacher(torch.cat([x_t, x_t]), torch.cat([img_ids, img_ids]),
                           txt_table[torch.cat([prompt, empty])], torch.cat([txt_ids, txt_ids]),
                           torch.cat([t, t]), vec_table[torch.cat([prompt, empty])])
            cond, uncond = both.chunk(2)
            target = uncond + guidance[:, None, None] * (cond - uncond)
        pred = student(x_t, img_ids, txt_table[prompt], txt_ids, t, vec_table[prompt], guidance)
        return F.mse_loss(pred.float(), target.float())

    def batch_fn(step, generator):
        x0, noise, t, prompt = rectified_flow_batch(config, latents, prompts, batch, generator, prompt_index[""])
        return x0, noise, t, prompt, low + (high - low) * torch.rand(batch, generator=generator)

    train_loop(config, workdir, "distill", student, schedule, loss_fn, batch_fn, final)


STAGES = {"text": build_text, "ae": train_autoencoder, "latents": encode_scenes, "dit": train_transformer,
          "distill": distill_guidance}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-train"),
                        help="checkpoints and intermediate files (default: ./demo-train); rerun to resume")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all, in order)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = DemoConfig()
    config_path = args.workdir / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != asdict(config):
        parser.error(f"{config_path} was written by another configuration; use a fresh --workdir")
    config_path.write_text(json.dumps(asdict(config), indent=1))
    for stage in STAGES:
        if stage in stages:
            start = time.time()
            STAGES[stage](config, args.workdir)
            print(f"{stage}: done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
