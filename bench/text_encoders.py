"""Text encoder speed and memory: our encoders on quantized weights against transformers' own bf16 model.

    python -m bench.text_encoders [--t5-blocks 1] [--formats F16,Q8_0,Q4_K,F8_E4M3] [--out FILE.md]

T5-XXL shapes (d_model 4096, d_ff 10240, 64 heads, vocab 32128; 24 blocks in the real model) are too large to build
whole on a small machine, so `--t5-blocks` real-size blocks are built and timed and the per-block cost is
extrapolated to 24 blocks (stated as such in the table). CLIP-L (12 layers, hidden 768) is built whole. Weights are
random: quantized ones are one quantized 256-row slab tiled to the full shape (timing does not depend on values).

For each format: encode time of one prompt at full length (T5 512 tokens, CLIP 77) in bf16 compute, best of
`--repeat` after a warm-up, and the peak RSS growth during the encode (sampled every 2 ms), on the CPU; on a GPU also
streamed (weights in pinned CPU memory, two blocks on the GPU) vs resident (all weights on the GPU) time and the
peak extra VRAM of a streamed encode. The baseline is transformers' `T5EncoderModel` / `CLIPTextModel` in bf16 on
the same device in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from datetime import date
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from engine.text_encoders import models
from engine.text_encoders.encoders import TextEncoder
from engine.text_encoders.layouts import EncoderFiles
from kernels.qtensor import QTensor

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu",
              dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
T5_XXL_BLOCKS = 24
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
SLAB_ROWS = 256


class _Ids:
    """A stand-in tokenizer: a fixed full-length id row (tokenization is not what is measured)."""

    def __init__(self, vocab: int, length: int):
        self.ids = torch.randint(3, vocab - 1, (1, length), generator=torch.Generator().manual_seed(0))

    def __call__(self, prompts, **kwargs):
        return {"input_ids": self.ids.expand(len(prompts), -1).clone()}


def random_weight(shape, fmt: str) -> QTensor:
    slab = torch.randn(min(SLAB_ROWS, shape[0]), shape[1]) / shape[1] ** 0.5
    if fmt in ("F32", "F16", "BF16"):
        q = models.as_qtensor(slab.to(getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[fmt])))
    elif fmt == "F8_E4M3":
        q = QTensor(slab.to(torch.float8_e4m3fn).view(torch.uint8), fmt, tuple(slab.shape))
    else:
        q = QTensor.quantize(slab, fmt)
    tiles = -(-shape[0] // q.raw.shape[0])
    return QTensor(q.raw.repeat(tiles, 1)[:shape[0]].contiguous(), fmt, tuple(shape))


def random_state(model_class, config, fmt: str) -> dict:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    return {k: random_weight(s, fmt) if len(s) == 2 and "relative" not in k and "position" not in k
            else torch.randn(s) * 0.1 + (1 if "norm" in k else 0) for k, s in shapes.items()}


def reference_model(model_class, config, device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)
    return model.to(torch.bfloat16).eval()


class PeakRSS:
    """Peak resident set growth over a block of code, sampled from /proc every 2 ms."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def timed(fn, repeat: int, device) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def encoder_for(kind: str, fmt: str, config, length: int) -> TextEncoder:
    model_class = T5EncoderModel if kind == "t5" else CLIPTextModel
    tensors = random_state(model_class, config, fmt)
    build = models.build_t5 if kind == "t5" else models.build_clip
    if kind == "t5":
        tensors.pop("encoder.embed_tokens.weight")
    model = build(tensors, config, torch.bfloat16)
    return TextEncoder(kind, model, _Ids(config.vocab_size, length), length, torch.bfloat16,
                       EncoderFiles(kind, Path("random"), Path("random"), None))


def run(kind: str, formats: list[str], blocks: int, repeat: int, device: torch.device) -> list[dict]:
    if kind == "t5":
        config, model_class, length, scale = T5Config(num_layers=blocks, **T5_XXL), T5EncoderModel, 512, \
            T5_XXL_BLOCKS / blocks
    else:
        config, model_class, length, scale = CLIPTextConfig(**CLIP_L), CLIPTextModel, 77, 1.0
    rows = []
    reference = reference_model(model_class, config, device)
    ids = _Ids(config.vocab_size, length).ids.to(device)
    with torch.inference_mode(), PeakRSS() as rss:
        seconds = timed(lambda: reference(input_ids=ids), repeat, device)
    rows.append(dict(kind=kind, format="transformers bf16", seconds=seconds * scale, rss=rss.growth, ratio=1.0))
    baseline = seconds
    del reference
    for fmt in formats:
        encoder = encoder_for(kind, fmt, config, length)
        with PeakRSS() as rss:
            seconds = timed(lambda: encoder.encode(["x"], device="cpu"), repeat, torch.device("cpu"))
        row = dict(kind=kind, format=fmt, seconds=seconds * scale, rss=rss.growth, ratio=seconds / baseline)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            streamed = timed(lambda: encoder.encode(["x"], device=device), repeat, device)
            row["vram"] = torch.cuda.max_memory_allocated(device) - before
            with encoder.resident(device):
                resident = timed(lambda: encoder.encode(["x"], device=device), repeat, device)
            row.update(streamed=streamed * scale, resident=resident * scale)
        rows.append(row)
        del encoder
    return rows


def table(rows: list[dict], blocks: int, gpu: bool) -> str:
    lines = []
    for kind in ("t5", "clip"):
        kind_rows = [r for r in rows if r["kind"] == kind]
        if not kind_rows:
            continue
        what = (f"T5-XXL, 512 tokens: {blocks} real-size block(s) timed, times extrapolated to all {T5_XXL_BLOCKS} "
                f"blocks (peak RSS is for the {blocks} block(s) built)" if kind == "t5"
                else "CLIP-L, 77 tokens, whole model")
        lines += [f"### {what}", ""]
        head = "| weights | CPU encode (s) | vs transformers bf16 | peak RSS growth during encode (MB) |"
        sep = "|---|---:|---:|---:|"
        if gpu:
            head += " GPU streamed (s) | GPU resident (s) | streamed / resident | streamed peak extra VRAM (GB) |"
            sep += "---:|---:|---:|---:|"
        lines += [head, sep]
        for r in kind_rows:
            line = f"| {r['format']} | {r['seconds']:.2f} | {r['ratio']:.2f}× | {r['rss'] / 1e6:.0f} |"
            if gpu and "streamed" in r:
                line += (f" {r['streamed']:.3f} | {r['resident']:.3f} | {r['streamed'] / r['resident']:.2f}× | "
                         f"{r['vram'] / 1e9:.2f} |")
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.text_encoders", description=__doc__.splitlines()[0])
    parser.add_argument("--t5-blocks", type=int, default=1, help="real-size T5-XXL blocks to build (of 24)")
    parser.add_argument("--formats", default="F16,Q8_0,Q4_K,F8_E4M3",
                        help="comma-separated weight formats to measure (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="timed encodes per measurement (default: %(default)s)")
    parser.add_argument("--only", choices=["t5", "clip"], help="one encoder only")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    formats = args.formats.split(",")
    rows = []
    for kind in ("t5", "clip"):
        if args.only in (None, kind):
            rows += run(kind, formats, args.t5_blocks, args.repeat, device)
    gpu = device.type == "cuda"
    header = (f"# `python -m bench.text_encoders` on {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {date.today()}\n\n"
              f"bf16 compute, one prompt, best of {args.repeat} after a warm-up; baseline: transformers' own model in "
              f"bf16 on the same device in the same run. "
              + ("" if gpu else "No GPU: the streamed / resident columns need a GPU run.") + "\n\n")
    text = header + table(rows, args.t5_blocks, gpu)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
