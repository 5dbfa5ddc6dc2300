"""Tiny CLIP and T5 text encoders and their tokenizers, built offline (for the tests and the demo model).

- `train_t5_tokenizer(folder)`: a SentencePiece Unigram model trained on a small corpus with T5's special ids
  (pad 0, eos 1, unk 2, no bos) and its default `nmt_nfkc` normalizer, saved as `spiece.model` and loaded by
  transformers' `T5Tokenizer` (its own SentencePiece conversion, which needs `protobuf`).
- `train_clip_tokenizer(folder)`: a byte-level BPE in CLIP's layout (`vocab.json`: the 256 byte symbols, the same
  with `</w>`, one entry per merge, then `<|startoftext|>` and `<|endoftext|>` last, so the end token has the highest
  id as in CLIP-L; `merges.txt`), merges learnt greedily on the same corpus, loaded by `CLIPTokenizer`.
- `tiny_t5` / `tiny_clip`: transformers' own models with random weights for those vocabularies.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

WORDS = ("a photo of the red green blue yellow purple orange cat dog fox bird square circle star triangle on in with "
         "background small large bright dark quick brown jumps over lazy painting portrait landscape city night "
         "sunset forest river mountain café naïve façade résumé Straße 東京 北京 こんにちは привет мир ﬁ ① Ⅻ ＡＢＣ "
         "🙂 🚀 don't it's 3 42 1024 x-ray e-mail #hashtag @user (parenthesis) [brackets] \"quoted\"").split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n)]


def train_t5_tokenizer(folder: Path, vocab_size: int = 200) -> T5Tokenizer:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.995, hard_vocab_limit=False, minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return T5Tokenizer.from_pretrained(folder)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_clip_tokenizer(folder: Path, merges: int = 200) -> CLIPTokenizer:
    byte_chars = bytes_to_unicode()
    words = Counter(word.lower() for line in corpus() for word in line.split())
    splits = {w: [byte_chars[b] for b in w.encode()] for w in words}
    for symbols in splits.values():
        symbols[-1] += "</w>"
    learnt = []
    for _ in range(merges):
        pairs = Counter()
        for w, symbols in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        learnt.append(best)
        for w, symbols in splits.items():
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1
    base = list(byte_chars.values())
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in learnt] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learnt))
    return CLIPTokenizer.from_pretrained(folder)


def t5_config(vocab_size: int, d_model: int = 64, d_ff: int = 128, layers: int = 2, heads: int = 4) -> T5Config:
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                    num_heads=heads, feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                    use_cache=False, tie_word_embeddings=False)


def clip_config(vocab_size: int, hidden: int = 128, layers: int = 2) -> CLIPTextConfig:
    # 64-dim heads, as every released CLIP text tower has (single files do not record the head count)
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that every layer matters (transformers' init makes T5 nearly an identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    return model.eval()


def tiny_t5(vocab_size: int, seed: int = 0, **sizes) -> T5EncoderModel:
    return _randomize(T5EncoderModel(t5_config(vocab_size, **sizes)), seed)


def tiny_clip(vocab_size: int, seed: int = 0, **sizes) -> CLIPTextModel:
    return _randomize(CLIPTextModel(clip_config(vocab_size, **sizes)), seed)
