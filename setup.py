from setuptools import find_packages, setup

setup(
    name="flux-quant-engine",
    version="0.1.0",
    description="Quantized inference engine for Flux.1: GGUF / NF4 / FP8 weights, fused Triton dequant-matmul kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "flux_model*", "bench*"]),
    package_data={
        "kernels": ["dispatch_tables/*.json"],  # measured per GPU by `python -m bench.kernels --write-dispatch`
        # the demo model `python -m engine.generate` runs without --model (written by `python -m bench.export_demo`)
        "engine": ["demo/*.json", "demo/*.gguf", "demo/*.safetensors", "demo/clip_tokenizer/*"],
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "gguf>=0.17",
        "safetensors",
        "transformers",
        "tokenizers",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # sentencepiece + protobuf: the text encoder tests train a T5 SentencePiece model, which transformers reads via protobuf;
        # peft: diffusers' load_lora_weights needs it (the LoRA tests' reference);
        # scikit-image, matplotlib: bench.quality's image metrics and plots, bench.demo_eval's object regions
        "test": ["pytest", "pytest-benchmark", "bitsandbytes>=0.45", "diffusers>=0.30", "sentencepiece", "protobuf", "peft",
                 "scikit-image", "matplotlib"],
    },
)
