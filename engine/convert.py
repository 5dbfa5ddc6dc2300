"""Convert any Flux transformer checkpoint to a GGUF file in the published (city96) layout.

    python -m engine.convert SRC --type Q4_K_S [--out flux1-dev-Q4_K_S.gguf] [--workers N] [--force] [--quiet]

SRC is anything `engine.checkpoints.load_checkpoint` reads (usually BFL's BF16 safetensors). The output loads in
ComfyUI-GGUF, stable-diffusion.cpp and our own loader:

- metadata `general.architecture = "flux"`, `general.quantization_version = 2`, `general.file_type` (llama.cpp's
  `LlamaFileType` number of the preset); no hyperparameters (readers infer them from names and shapes); BFL names.
- Only the 2-D weights inside `double_blocks.*` / `single_blocks.*` are quantized (304 for Flux-dev). The rest is
  stored as city96's files store it (`engine.presets`): in the K-quant and IQ presets, as llama-quantize with his
  patch (ComfyUI-GGUF tools/lcpp.patch) leaves them, `img_in`, the `*_in.in_layer`s and `final_layer.linear` weights
  F32, the other 2-D weights (`txt_in`, the `*_in.out_layer`s, `final_layer.adaLN_modulation`) F16 and every 1-D
  tensor F32; in the legacy Q*_0 / Q*_1 presets everything F16. The published files' sizes match this to the
  hundredth of a GB for every type; F16 and BF16 store everything in that type.
- `_M` presets put the double blocks' `img_attn.qkv` / `txt_attn.qkv` one type up. City96's llama.cpp patch
  (ComfyUI-GGUF tools/lcpp.patch) bumps names containing "attn.qkv.weight", which no single-block tensor has (their
  q, k, v live in `linear1` together with the MLP input), and none of llama.cpp's other `_M` rules (attn_v, ffn_down,
  attn_output) match a Flux name: so single blocks stay in the base type here too.
- A block weight whose row length is not a whole number of the type's blocks falls back to F16, as llama.cpp's
  patched quantizer does (never the case for Flux).

Tensors are quantized with the torch quantizers (byte-identical to `kernels.reference`) in row chunks, in worker
processes when `--workers` > 1, and streamed to a temporary file next to the output that is renamed at the end; on any
error or interruption the temporary is deleted and no output appears. Peak memory: the mapped input, one output tensor
and a few row chunks in flight.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import math
import multiprocessing
import os
import secrets
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter

from engine.errors import ModelFileError
from engine.presets import F32_LAYERS, PRESETS, tensor_format
from kernels import torch_codecs
from kernels.formats import get_format
from kernels.qtensor import QTensor

log = logging.getLogger("engine.convert")

CHUNK_ELEMENTS = 1 << 20  # weights per row chunk sent to a worker (4 MiB of float32)
INFLIGHT_PER_WORKER = 2  # row chunks queued per worker: keeps workers busy while bounding memory
# Families whose quantizers are slow enough (~8-20 M weights/s, search loops) to be worth shipping rows to a worker;
# the legacy and float codecs run at 80-1000 M weights/s in-process, where pickling 4 MiB chunks costs more than it
# saves (bench.convert measured 2 workers at 0.3-0.5x of in-process for Q8_0/Q4_0/Q5_1).
PARALLEL_FAMILIES = frozenset({"kquants", "iquants"})


class ConversionError(RuntimeError):
    """A tensor that cannot be converted (e.g. inf/nan in a weight to quantize); the message names it."""


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------- encoding

# 16-bit source rows travel to workers as their raw int16 bits (half the bytes of float32, which pipes and pickling
# would otherwise spend CPU on) and are widened there, exactly.
_SIXTEEN_BIT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _quantize_chunk(x: np.ndarray, fmt: str, dtype: str = "float32") -> np.ndarray:
    """Rows (float32, or the int16 bits of `dtype` bf16/f16) -> uint8 `(rows, row_bytes)`; in a worker or inline."""
    rows = torch.from_numpy(x)
    if dtype in _SIXTEEN_BIT:
        rows = rows.view(_SIXTEEN_BIT[dtype]).float()
    return torch_codecs.quantize(rows, fmt).numpy()


_BARRIER = None  # in a worker: the pool's barrier, where warm-up tasks wait for each other


def _exit(signum, frame):
    sys.exit(128 + signum)


def _init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it cancels and cleans up
    # `stop_pool` terminates workers: leave through Python's exit, whose clean-up stops torch.compile's own compile
    # workers (killed outright, they leave semaphores that the resource tracker reports as leaked at exit)
    signal.signal(signal.SIGTERM, _exit)


def worker_pool(workers: int) -> cf.ProcessPoolExecutor | None:
    """A pool of `workers` quantizing processes ('spawn': no forked torch state), or None for `workers` <= 1."""
    if workers <= 1:
        return None
    context = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                  initargs=(context.Barrier(workers),))


def stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Stop the workers now. `shutdown(cancel_futures=True)` alone waits for the tasks already running, which during
    the warm-up are compiles of ~9 s: Ctrl-C would take that long. (Python 3.14 has `terminate_workers()` for this.)"""
    for process in list(pool._processes.values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def compiled_formats(formats: Iterable[str]) -> list[str]:
    """The formats among `formats` whose quantizer is compiled at its first call (the K-quants' scale search, with
    torch.compile on the CPU), in order, once each."""
    return list(dict.fromkeys(f for f in formats if get_format(f).family == "kquants"))


def _warm(formats: list[str], barrier=None) -> int:
    """Quantize one row chunk of Flux's width in each format: a K-quant's first call compiles its search (~9 s on 2
    cores), which every later call reuses. With a barrier, wait for the pool's other workers: each then holds one
    warm-up task, so all of them are warm whichever started first. Returns this process's id."""
    x = torch.randn(CHUNK_ELEMENTS // 3072, 3072, generator=torch.Generator().manual_seed(0)) * 0.02
    for fmt in formats:
        torch_codecs.quantize(x, fmt)
    if barrier is not None:
        barrier.wait()
    return os.getpid()


def _warm_worker(formats: list[str]) -> int:
    return _warm(formats, _BARRIER)


def warm_up(formats: Iterable[str], pool: cf.ProcessPoolExecutor | None) -> list[int]:
    """Compile the quantizers of `formats` (see `compiled_formats`) where they will run: in every worker of `pool`, or
    in this process without one; returns the ids of the processes warmed. Before a progress bar or a timing starts.
    A pool is warmed even when no format compiles: its workers are then started."""
    formats = compiled_formats(formats)
    if pool is None:
        return [_warm(formats)]
    futures = [pool.submit(_warm_worker, formats) for _ in range(pool._max_workers)]
    return [future.result() for future in futures]


def _source_rows(source, r0: int, r1: int) -> torch.Tensor:
    """Rows `r0:r1` of a tensor or QTensor seen as `(rows, shape[-1])`, in float32."""
    if isinstance(source, QTensor):
        return QTensor(source.raw[r0:r1], source.format, (r1 - r0, source.shape[-1]), source.scale).dequantize()
    return source.reshape(-1, source.shape[-1])[r0:r1].to(torch.float32)


class _Done:
    """An already computed result with a future's `result()`."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self):
        return False


def encode(items: Iterable[tuple[str, object, str]], pool: cf.ProcessPoolExecutor | None = None,
           progress=None) -> Iterator[tuple[str, np.ndarray]]:
    """Encode `(name, tensor or QTensor, format)` items; yields `(name, uint8 (rows, row_bytes))` in input order.

    Row chunks of K-quant and IQ formats go to `pool` (at most INFLIGHT_PER_WORKER per worker at a time); plain float
    formats and everything without a pool are encoded inline. Chunking never changes the bytes: blocks run along rows
    and are encoded independently. `progress` (a tqdm bar) is advanced by the weights done."""
    max_inflight = INFLIGHT_PER_WORKER * pool._max_workers if pool is not None else 0
    pending: deque = deque()  # (tensor state, r0, r1, future) in submission order
    try:
        for name, source, fmt in items:
            f = get_format(fmt)
            shape = tuple(source.shape)
            if not shape:
                raise ConversionError(f"tensor {name!r} is a scalar; GGUF stores tensors of 1 to 4 dimensions")
            n = shape[-1]
            rows = math.prod(shape[:-1])
            state = {"name": name, "fmt": fmt, "shape": shape, "rows": rows, "left": rows, "buf": None}
            step = max(1, CHUNK_ELEMENTS // n)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                if pool is not None and f.family in PARALLEL_FAMILIES:
                    dtype = str(getattr(source, "dtype", "")).removeprefix("torch.")
                    if dtype in _SIXTEEN_BIT:
                        x = source.reshape(-1, n)[r0:r1].view(torch.int16).numpy()
                    else:
                        dtype, x = "float32", _source_rows(source, r0, r1).numpy()
                    future = pool.submit(_quantize_chunk, x, fmt, dtype)
                else:
                    x = _source_rows(source, r0, r1).numpy()
                    future = _Done(_call(_quantize_chunk, state, x, fmt))
                pending.append((state, r0, r1, future))
                del x
                while len(pending) > max_inflight:
                    yield from _collect(pending, progress)
        while pending:
            yield from _collect(pending, progress)
    finally:
        for *_, future in pending:
            future.cancel()


def _call(fn, state, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise ConversionError(f"tensor {state['name']!r} {list(state['shape'])} -> {state['fmt']}: {e}") from e


def _collect(pending: deque, progress) -> Iterator[tuple[str, np.ndarray]]:
    """Take the oldest chunk's result; yield its tensor when that was the tensor's last chunk."""
    state, r0, r1, future = pending.popleft()
    raw = _call(future.result, state)
    if state["buf"] is None:
        state["buf"] = np.empty((state["rows"], raw.shape[-1]), dtype=np.uint8)
    state["buf"][r0:r1] = raw
    state["left"] -= r1 - r0
    if progress is not None:
        progress.update((r1 - r0) * state["shape"][-1])
    if state["left"] == 0:
        yield state["name"], state["buf"]
        state["buf"] = None


# ----------------------------------------------------------------------------------------------------------- convert

def default_output(src: Path, type_name: str) -> Path:
    stem = src.name[:-len(".index.json")] if src.name.endswith(".index.json") else src.stem
    return src.with_name(f"{stem}-{type_name}.gguf")


def _new_temporary(out: Path) -> Path:
    """A new empty file next to `out`, to be renamed to it. Created with mode 0666 less the umask, as `open` creates
    files: the rename keeps the mode, and mkstemp's 0600 would hide the output from other accounts (a ComfyUI
    service). The name is unique per process and call; O_EXCL refuses to reuse a file that is there."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def convert(src, out, type_name: str, *, workers: int = 1, force: bool = False, progress: bool = True) -> Path:
    """Convert checkpoint `src` to GGUF file `out` with preset `type_name`; returns `out`.

    Raises FileExistsError when `out` exists and not `force`, ModelFileError for an unusable source, ConversionError
    for a tensor that cannot be stored in its format. No partial file is left behind on any error."""
    from tqdm import tqdm

    from engine.checkpoints import load_checkpoint

    preset = PRESETS[type_name]
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():  # a typo in the path must not create a directory tree
        raise FileNotFoundError(f"the output's directory {out.parent} does not exist")
    tensors = load_checkpoint(src)

    requantized = sorted({t.format for t in tensors.values() if isinstance(t, QTensor)})
    if requantized:
        n = sum(isinstance(t, QTensor) for t in tensors.values())
        log.warning("%d tensors of %s are stored quantized (%s): dequantizing them before converting; requantizing "
                    "is lossy, convert from the BF16 original where you can", n, src, ", ".join(requantized))
    plan = [(name, t, tensor_format(name, tuple(t.shape), preset)) for name, t in tensors.items()]
    n_quantized = sum(get_format(fmt).is_quantized for _, _, fmt in plan)
    parallel = any(get_format(fmt).family in PARALLEL_FAMILIES for _, _, fmt in plan)
    compiled = compiled_formats(fmt for _, _, fmt in plan)
    total = sum(math.prod(t.shape) for t in tensors.values())
    others = sorted({fmt for _, _, fmt in plan if not get_format(fmt).is_quantized})
    log.info("%s -> %s: %s, %d tensors, %d quantized (%s), others %s, %d worker%s", src, out, type_name, len(plan),
             n_quantized, "/".join(sorted({preset.block, preset.qkv})), "/".join(others), workers,
             "" if workers == 1 else "s")

    tmp = _new_temporary(out)
    writer = pool = None
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # One intra-op thread: the quantizers are bound by Python dispatch, and torch's thread pool collapses (10-50x
    # slower, measured) when its threads compete with the workers or other processes for the cores.
    torch.set_num_threads(1)
    try:
        writer = GGUFWriter(tmp, "flux")
        writer.add_quantization_version(GGML_QUANT_VERSION)
        writer.add_file_type(int(preset.file_type))
        for name, t, fmt in plan:
            f = get_format(fmt)
            shape = tuple(t.shape)
            writer.add_tensor_info(name, (*shape[:-1], f.row_bytes(shape[-1])), np.dtype(np.uint8),
                                   math.prod(shape[:-1]) * f.row_bytes(shape[-1]),
                                   raw_dtype=GGMLQuantizationType(f.ggml_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        pool = worker_pool(workers) if parallel else None
        warm_start = time.perf_counter()
        if compiled:
            log.info("compiling the %s quantizer%s in %s (about 10 s) ...", "/".join(compiled),
                     "s" if len(compiled) > 1 else "", "this process" if pool is None else f"{workers} workers")
            warm_up(compiled, pool)
        warm_seconds = time.perf_counter() - warm_start
        # after the warm-up: a bar started before it averages the compile into its rate and shows absurd ETAs
        with tqdm(total=total, unit="w", unit_scale=True, disable=not progress, desc=type_name) as bar:
            for name, raw in encode(plan, pool, bar):
                writer.write_tensor_data(raw)
        writer.close()
        if out.exists() and not force:
            raise FileExistsError(f"{out} appeared during the conversion; pass --force to overwrite it")
        os.replace(tmp, out)
    except BaseException:
        if pool is not None:
            stop_pool(pool)
            pool = None
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown()
    seconds = time.perf_counter() - start
    log.info("wrote %s: %.2f GB in %.0f s, %.0f s of it compiling; %.1f M weights/s after that", out,
             out.stat().st_size / 1e9, seconds, warm_seconds, total / max(seconds - warm_seconds, 1e-9) / 1e6)
    return out


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(PRESETS)
    parser = argparse.ArgumentParser(
        prog="python -m engine.convert",
        description="Convert a Flux transformer checkpoint to a GGUF file in the published (city96) layout.",
        epilog="presets (block type / attn.qkv type / other 2-D / 1-D tensors): "
               + "; ".join(f"{k} {p.block}/{p.qkv}/{p.matrix}/{p.vector}" for k, p in PRESETS.items())
               + f"; K-quant and IQ presets keep {', '.join(p.rstrip('.') for p in F32_LAYERS)} in F32")
    parser.add_argument("src", type=Path, help="checkpoint: safetensors (BFL, ComfyUI, diffusers, FP8, NF4) or GGUF")
    parser.add_argument("--type", required=True, type=str.upper, choices=list(PRESETS), metavar="TYPE",
                        help=f"preset, one of: {presets}")
    parser.add_argument("--out", type=Path, help="output .gguf (default: SRC's name with -TYPE.gguf, next to it)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="quantizing processes (default: the number of CPU cores, here %(default)s; "
                             "1 = quantize in this process)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"argument --workers: must be at least 1, got {args.workers}")
    # torch's CPU allocator backs large tensors with transparent huge pages when this is set before its first large
    # allocation; without it the quantizers' big temporaries page-fault afresh in every chunk (a 623M-weight Q4_K_S
    # conversion with 2 workers: 40 s -> 33 s, system time 10.5 s -> 3.9 s). Spawned workers inherit it.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer announces endianness and shard plans
    out = args.out or default_output(args.src, args.type)
    try:
        convert(args.src, out, args.type, workers=args.workers, force=args.force, progress=not args.quiet)
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: writing {out}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
