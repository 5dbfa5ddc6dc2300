"""The quantization comparison, measured: `python -m bench.quality` (see `__main__`). Levels (`levels`), metrics
(`metrics`), the runs and their cache (`runs`), Flux-dev memory and the recommendation (`vram`), the written report
(`report`)."""
