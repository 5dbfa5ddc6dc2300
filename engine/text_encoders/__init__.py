"""Flux's text encoders, kept in CPU RAM: CLIP-L (the pooled vector `vec`) and T5-XXL (the token states `txt`).

    from engine.text_encoders import TextConditioner, load_clip, load_t5

    t5 = load_t5("t5-v1_1-xxl-encoder-Q8_0.gguf", max_length=512)     # weights stay quantized and memory-mapped
    txt = t5.encode(["a photo of a cat"], device="cuda")               # streamed through the GPU block by block
    conditioner = TextConditioner("clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors")
    txt, vec = conditioner.encode(["a photo of a cat"])                # cached per prompt, encoders loaded lazily

Modules: `layouts` (which file holds what), `gguf_t5` (city96's T5 GGUF, read and write), `tokenization`,
`models` (transformers' models on quantized weights), `streaming` (block-by-block GPU execution), `cache` (prompt
cache), `encoders` (load_clip / load_t5), `conditioner` (TextConditioner).
"""

from engine.text_encoders.conditioner import TextConditioner
from engine.text_encoders.encoders import TextEncoder, load_clip, load_t5
from engine.text_encoders.gguf_t5 import save_t5_gguf

__all__ = ["TextConditioner", "TextEncoder", "load_clip", "load_t5", "save_t5_gguf"]
