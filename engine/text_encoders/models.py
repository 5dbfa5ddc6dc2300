"""transformers' `CLIPTextModel` / `T5EncoderModel`, built on the meta device and given our weights: every Linear a
`QuantLinear` over a `QTensor` (quantized or plain F16/BF16/F32 bytes, left where the file put them), the token
embedding a row-gathering `QuantEmbedding`, norms and biases dense in the compute dtype.

Configs come from a folder's `config.json` when there is one, else from tensor shapes (`clip_config`, `t5_config`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from kernels.qtensor import QTensor
from kernels.quant_linear import QuantLinear

FLOAT_FORMATS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def as_qtensor(t: torch.Tensor | QTensor) -> QTensor:
    """A weight as a `QTensor`: float tensors become F32/F16/BF16 `QTensor`s over the same bytes (no copy)."""
    if isinstance(t, QTensor):
        return t
    if t.dtype not in FLOAT_FORMATS:
        raise ValueError(f"weight of dtype {t.dtype} is not a float tensor")
    t = t.contiguous()
    return QTensor(t.reshape(-1, t.shape[-1]).view(torch.uint8), FLOAT_FORMATS[t.dtype], tuple(t.shape))


def dense(t: torch.Tensor | QTensor, dtype: torch.dtype) -> torch.Tensor:
    return (t.dequantize(torch.float32) if isinstance(t, QTensor) else t).to(dtype)


class EncoderLinear(QuantLinear):
    """`QuantLinear` for the text encoders.

    On the CPU it always decodes with the torch codecs, one Linear at a time, never through the Triton interpreter
    (which `TRITON_INTERPRET=1` would select; it is slow and wrong for bf16), and multiplies in float32. `matmul_dtype` runs the product in
    another dtype: T5's feed-forward output `wo` overflows fp16, so under fp16 it runs in float32, as transformers'
    `_keep_in_fp32_modules = ["wo"]` does (the residual stream then follows in float32).
    """

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None, matmul_dtype: torch.dtype | None = None):
        super().__init__(weight, bias)
        self.matmul_dtype = matmul_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul_dtype is not None:
            x = x.to(self.matmul_dtype)
        if x.is_cuda:
            return super().forward(x)
        # On the CPU the product runs in float32 whatever the compute dtype: torch's fp32 GEMM is its fast CPU path
        # (2-core VM: 110 GFLOP/s fp32 vs 71 bf16, despite AVX512-BF16), and decoding to fp32 skips a cast.
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight.dequantize(torch.float32), bias).to(x.dtype)


class QuantEmbedding(nn.Module):
    """Token embedding over a `QTensor` table that stays where it is (CPU memory, usually a file map): a lookup
    gathers and decodes only the rows of the requested ids, on the table's device, and returns them on the ids'."""

    def __init__(self, weight: QTensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("raw", weight.raw)  # like QuantLinear: the bytes are a buffer, `weight` a view of them
        self.format, self.shape, self.scale, self.dtype = weight.format, weight.shape, weight.scale, dtype

    @property
    def weight(self) -> QTensor:
        return QTensor(self.raw, self.format, self.shape, self.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = w.raw[ids.reshape(-1).to(w.device)]
        values = QTensor(rows, w.format, (rows.shape[0], w.shape[-1]), w.scale).dequantize(self.dtype)
        return values.reshape(*ids.shape, w.shape[-1]).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, format={self.weight.format}"


def clip_config(tensors: dict) -> CLIPTextConfig:
    """CLIP-L's released config with the sizes read off the weights. Heads are hidden / 64: every released CLIP text
    tower (B/L/G) has 64-dim heads, and the files do not record the count."""
    vocab, hidden = tensors["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(name.split(".")[2]) for name in tensors if name.startswith("encoder.layers."))
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=tensors["encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=tensors["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=hidden,
        # openai/clip-vit-large-patch14's config.json: eos_token_id 2 makes transformers pool at argmax(input_ids)
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def t5_config(tensors: dict, metadata: dict | None = None) -> T5Config:
    """T5 v1.1's config (RMSNorm eps 1e-6, 32 buckets, max distance 128) with the sizes read off the weights;
    a GGUF's `t5encoder.*` hyperparameters take precedence where present."""
    meta = metadata or {}
    rel_bias = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    buckets, heads = rel_bias.shape
    heads = meta.get("t5encoder.attention.head_count", heads)
    inner = tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in tensors
    wi = tensors["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    embedding = tensors["shared.weight"]
    return T5Config(
        vocab_size=embedding.shape[0], d_model=embedding.shape[1], d_ff=wi.shape[0], num_heads=heads,
        d_kv=meta.get("t5encoder.attention.key_length", inner // heads),
        num_layers=1 + max(int(name.split(".")[2]) for name in tensors if name.startswith("encoder.block.")),
        relative_attention_num_buckets=meta.get("t5encoder.attention.relative_buckets_count", buckets),
        layer_norm_epsilon=meta.get("t5encoder.attention.layer_norm_rms_epsilon", 1e-6),
        feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0, is_encoder_decoder=False,
        use_cache=False, tie_word_embeddings=False,
    )


def _check_shapes(model: nn.Module, tensors: dict, config) -> None:
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{len(missing)} tensors missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ValueError(f"{name} has shape {list(got)}, the config ({type(config).__name__}) wants {list(shape)}")


def _materialize(model: nn.Module, tensors: dict, dtype: torch.dtype, matmul_dtypes: dict[str, torch.dtype]) -> None:
    """Put `tensors` (model names) into the meta-built `model`: Linears become `EncoderLinear`s, `nn.Embedding`s
    whose table is the token embedding become `QuantEmbedding`s, everything else a dense parameter in `dtype`."""
    embeddings: dict[int, QuantEmbedding] = {}  # T5 ties `shared` and `encoder.embed_tokens`: one module for both
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(module, nn.Linear):
            bias = tensors.get(name + ".bias")
            layer = EncoderLinear(as_qtensor(tensors[name + ".weight"]),
                                  None if bias is None else dense(bias, dtype),
                                  matmul_dtypes.get(attr))
            setattr(owner, attr, layer)
        elif isinstance(module, nn.Embedding) and module.weight.shape[0] == model.config.vocab_size:
            key = id(module)
            if key not in embeddings:
                embeddings[key] = QuantEmbedding(as_qtensor(tensors[name + ".weight"]), dtype)
            setattr(owner, attr, embeddings[key])
    for name, param in list(model.named_parameters()):
        if not param.is_meta:  # the biases of the Linears just built
            continue
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        owner._parameters[attr] = nn.Parameter(dense(tensors[name], dtype), requires_grad=False)


def build_clip(tensors: dict, config: CLIPTextConfig, dtype: torch.dtype) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(config)
    _check_shapes(model, tensors, config)
    _materialize(model, tensors, dtype, {})
    # a non-persistent buffer that the meta device left empty
    model.embeddings.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
    return model.eval()


def build_t5(tensors: dict, config: T5Config, dtype: torch.dtype) -> T5EncoderModel:
    tensors = {**tensors, "encoder.embed_tokens.weight": tensors["shared.weight"]}
    with torch.device("meta"):
        model = T5EncoderModel(config)
    _check_shapes(model, tensors, config)
    _materialize(model, tensors, dtype, {"wo": torch.float32} if dtype == torch.float16 else {})
    return model.eval()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks that stream through the GPU one at a time."""
    return model.encoder.block if isinstance(model, T5EncoderModel) else model.encoder.layers
