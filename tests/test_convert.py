"""`python -m engine.convert`: published GGUF layout per preset, bytes equal to the numpy reference quantizers, read back
by gguf's own reader and dequantizer and by our loader; workers, atomic output, CLI errors."""

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import convert
from engine.checkpoints import load_checkpoint
from kernels import QTensor, reference
from kernels.formats import get_format
from tests.flux_fixtures import flux_shapes, is_block_weight

ROOT = Path(__file__).resolve().parents[1]
# hidden 256: every block weight's rows (256, 512 = hidden + mlp) are whole K-quant blocks; head size 16 (axes 2/7/7).
DIMS = dict(hidden=256, heads=16, depth=1, depth_single=1, mlp_ratio=1.0, context=64, vec=32, in_channels=64)
N_BLOCK_WEIGHTS = 2 * 5 + 3  # one double block (img + txt, 5 linears each) and one single block (3 linears)
EXPECTED = {  # preset -> (block type, qkv type, unquantized layout, general.file_type)
    "Q8_0": ("Q8_0", "Q8_0", "F16", 7), "Q6_K": ("Q6_K", "Q6_K", "lcpp", 18),
    "Q5_K_M": ("Q5_K", "Q6_K", "lcpp", 17), "Q5_K_S": ("Q5_K", "Q5_K", "lcpp", 16),
    "Q5_1": ("Q5_1", "Q5_1", "F16", 9), "Q5_0": ("Q5_0", "Q5_0", "F16", 8),
    "Q4_K_M": ("Q4_K", "Q5_K", "lcpp", 15), "Q4_K_S": ("Q4_K", "Q4_K", "lcpp", 14),
    "Q4_1": ("Q4_1", "Q4_1", "F16", 3), "Q4_0": ("Q4_0", "Q4_0", "F16", 2),
    "IQ4_NL": ("IQ4_NL", "IQ4_NL", "lcpp", 25), "IQ4_XS": ("IQ4_XS", "IQ4_XS", "lcpp", 30),
    "Q3_K_M": ("Q3_K", "Q4_K", "lcpp", 12), "Q3_K_S": ("Q3_K", "Q3_K", "lcpp", 11),
    "Q2_K": ("Q2_K", "Q2_K", "lcpp", 10),
    "F16": ("F16", "F16", "F16", 1), "BF16": ("BF16", "BF16", "BF16", 32),
}


def unquantized_type(name, shape, layout):
    """What city96's files store a non-block tensor as. "lcpp": llama-quantize with ComfyUI-GGUF's tools/lcpp.patch
    (img_tensor_get_type: "keep in FP32" names, then "keep in FP16" names) over tools/convert.py's output (1-D
    tensors F32, which llama-quantize does not touch). Otherwise everything in `layout`."""
    if layout != "lcpp":
        return layout
    if len(shape) == 1:
        return "F32"
    fp32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")
    fp16 = ("txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
    if any(key in name for key in fp32):
        return "F32"
    assert any(key in name for key in fp16), name  # the patch has a rule for every non-block Flux weight
    return "F16"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Flux-dev-shaped BF16 safetensors checkpoint with BFL names: (path, tensors)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16)
               for name, shape in flux_shapes(**DIMS).items()}
    path = tmp_path_factory.mktemp("src") / "tiny-flux.safetensors"
    save_file(tensors, path)
    return path, tensors


@functools.lru_cache(maxsize=None)
def _reference_bytes(name: str, fmt: str, data: bytes, shape: tuple) -> np.ndarray:
    x = torch.frombuffer(bytearray(data), dtype=torch.bfloat16).reshape(shape).float().numpy()
    return reference.quantize(x, fmt)


def reference_bytes(name, tensor, fmt):
    """The numpy reference encoding of a BF16 source tensor, cached across presets (Q4_K appears in three)."""
    return _reference_bytes(name, fmt, tensor.view(torch.int16).numpy().tobytes(), tuple(tensor.shape))


def run(*argv):
    return convert.main([*map(str, argv), "--quiet"])


def test_preset_table_matches_llama_cpp_file_types():
    assert set(convert.PRESETS) == set(EXPECTED)
    for name, preset in convert.PRESETS.items():
        assert (preset.block, preset.qkv, int(preset.file_type)) == tuple(EXPECTED[name][i] for i in (0, 1, 3))
        assert preset.file_type.name == ("MOSTLY_" + name), name  # llama.cpp's own name for the preset


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_convert_preset(source, tmp_path, preset):
    src, tensors = source
    out = tmp_path / f"out-{preset}.gguf"
    assert run(src, "--type", preset, "--out", out, "--workers", 1) == 0
    block, qkv, layout, file_type = EXPECTED[preset]

    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields == {"general.architecture": "flux", "general.quantization_version": 2,
                      "general.file_type": file_type}
    loaded = load_checkpoint(out)
    assert [t.name for t in reader.tensors] == list(loaded)  # the source's order (safetensors: sorted names)
    assert set(loaded) == set(tensors)

    n_quantized = 0
    for t in reader.tensors:
        source_tensor = tensors[t.name]
        shape = tuple(source_tensor.shape)
        if is_block_weight(t.name):
            expected_type = qkv if t.name.endswith("attn.qkv.weight") else block
            n_quantized += 1
        else:
            expected_type = unquantized_type(t.name, shape, layout)
        assert t.tensor_type.name == expected_type, t.name
        assert tuple(int(d) for d in reversed(t.shape)) == shape, t.name  # GGUF dims are innermost first

        # gguf's own dequantizer equals our loader's reading
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        ours = loaded[t.name]
        ours = ours.dequantize() if isinstance(ours, QTensor) else ours.float()
        np.testing.assert_array_equal(values.astype(np.float32), ours.numpy(), err_msg=t.name)

        fmt = get_format(expected_type)
        if fmt.is_quantized:  # bytes equal the independent numpy reference quantizer's
            raw = np.asarray(t.data).view(np.uint8).reshape(shape[0], -1)
            np.testing.assert_array_equal(raw, reference_bytes(t.name, source_tensor, expected_type), err_msg=t.name)
        else:  # plain floats: the BF16 source rounded to that type
            expected = source_tensor.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name])
            np.testing.assert_array_equal(values.astype(np.float32), expected.float().numpy(), err_msg=t.name)
    assert n_quantized == N_BLOCK_WEIGHTS
    assert "double_blocks.0.img_attn.qkv.weight" in tensors and "single_blocks.0.linear1.weight" in tensors


def test_m_presets_bump_only_double_block_qkv():
    preset = convert.PRESETS["Q4_K_M"]
    types = {name: convert.tensor_format(name, shape, preset) for name, shape in flux_shapes(**DIMS).items()}
    assert types["double_blocks.0.img_attn.qkv.weight"] == types["double_blocks.0.txt_attn.qkv.weight"] == "Q5_K"
    assert types["single_blocks.0.linear1.weight"] == "Q4_K"  # q, k, v and MLP-in share it; llama.cpp keeps base
    assert types["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert types["double_blocks.0.img_attn.norm.query_norm.scale"] == "F32"
    assert sum(t in ("Q4_K", "Q5_K") for t in types.values()) == N_BLOCK_WEIGHTS


def test_row_length_not_whole_blocks_falls_back_to_f16():  # as city96's patched llama-quantize does
    preset = convert.PRESETS["Q4_K_S"]
    assert convert.tensor_format("single_blocks.0.linear2.weight", (64, 320), preset) == "F16"
    assert convert.tensor_format("single_blocks.0.linear2.weight", (64, 320), convert.PRESETS["Q4_0"]) == "Q4_0"


def test_workers_give_identical_bytes(source, tmp_path, monkeypatch):
    preset = "Q4_K_M"  # K-quants go to the workers (legacy formats are encoded in-process either way)
    src, _ = source
    monkeypatch.setattr(convert, "CHUNK_ELEMENTS", 1 << 16)  # several row chunks per tensor, out of order completion
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    assert run(src, "--type", preset, "--out", one, "--workers", 1) == 0
    assert run(src, "--type", preset, "--out", two, "--workers", 2) == 0
    assert one.read_bytes() == two.read_bytes()


def test_requantizing_a_gguf_source_dequantizes_first(source, tmp_path, caplog):
    src, _ = source
    q8 = tmp_path / "q8.gguf"
    assert run(src, "--type", "Q8_0", "--out", q8, "--workers", 1) == 0
    out = tmp_path / "q4.gguf"
    with caplog.at_level("WARNING", logger="engine.convert"):
        convert.convert(q8, out, "Q4_0", workers=1, progress=False)
    assert "requantizing is lossy" in caplog.text
    loaded_q8, loaded = load_checkpoint(q8), load_checkpoint(out)
    name = "single_blocks.0.linear2.weight"
    expected = reference.quantize(loaded_q8[name].dequantize().numpy(), "Q4_0")
    np.testing.assert_array_equal(loaded[name].raw.numpy(), expected)


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_leaves_no_file(source, tmp_path, monkeypatch, exception):
    src, _ = source
    real, calls = convert._quantize_chunk, []

    def failing(x, fmt):
        calls.append(fmt)
        if len(calls) == 20:
            raise exception("simulated failure")
        return real(x, fmt)

    monkeypatch.setattr(convert, "_quantize_chunk", failing)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "flux.gguf"
    with pytest.raises(exception, match="simulated failure"):
        convert.convert(src, out, "Q4_0", workers=1, progress=False)
    assert len(calls) == 20
    assert _listing(out_dir) == []  # neither the output nor the temporary


def test_interrupt_exit_code(source, tmp_path, monkeypatch, capsys):
    src, _ = source
    monkeypatch.setattr(convert, "_quantize_chunk", lambda x, fmt: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert run(src, "--type", "Q4_0", "--out", tmp_path / "x.gguf", "--workers", 1) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _listing(tmp_path) == []


def test_nan_weight_is_reported_by_name(tmp_path, source, capsys):
    _, tensors = source
    bad = dict(tensors)
    bad["single_blocks.0.linear2.weight"] = bad["single_blocks.0.linear2.weight"].clone()
    bad["single_blocks.0.linear2.weight"][3, 5] = float("nan")
    src = tmp_path / "bad.safetensors"
    save_file(bad, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert run(src, "--type", "Q4_0", "--out", out_dir / "x.gguf", "--workers", 1) == 1
    assert "single_blocks.0.linear2.weight" in capsys.readouterr().err
    assert _listing(out_dir) == []


def test_existing_output_needs_force(source, tmp_path, capsys):
    src, _ = source
    out = tmp_path / "flux.gguf"
    out.write_bytes(b"keep me")
    assert run(src, "--type", "Q8_0", "--out", out, "--workers", 1) == 1
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert run(src, "--type", "Q8_0", "--out", out, "--workers", 1, "--force") == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == 7
    assert _listing(tmp_path) == ["flux.gguf"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_output_mode_follows_the_umask(source, tmp_path, umask):
    src, _ = source
    out = tmp_path / "flux.gguf"
    previous = os.umask(umask)
    try:
        assert run(src, "--type", "Q4_0", "--out", out, "--workers", 1) == 0
        made_by_open = tmp_path / "plain"
        made_by_open.write_bytes(b"")  # what any other written file gets
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == made_by_open.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_output_directory_is_an_error_not_created(source, tmp_path, capsys):
    src, _ = source
    assert run(src, "--type", "Q4_0", "--out", tmp_path / "typo" / "deeper" / "flux.gguf", "--workers", 1) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{tmp_path / 'typo' / 'deeper'} does not exist" in err
    assert _listing(tmp_path) == []


def test_warm_up_reaches_every_worker():
    # One warm-up task per worker whatever their start-up order: they wait for each other at the pool's barrier
    # (before, a worker that started first could take every task and leave the others cold).
    pool = convert.worker_pool(3)
    try:
        pids = convert.warm_up([], pool)
        assert len(pids) == len(set(pids)) == 3
        assert set(pids) == {p.pid for p in pool._processes.values()}
    finally:
        pool.shutdown()


def test_stop_pool_does_not_wait_for_running_tasks():
    pool = convert.worker_pool(2)
    futures = [pool.submit(time.sleep, 300) for _ in range(2)]
    convert.warm_up([], None)  # nothing to compile here; the sleeps are now queued or running
    start = time.perf_counter()
    convert.stop_pool(pool)
    assert time.perf_counter() - start < 60  # a worker's start-up at most, not the 300 s task
    assert all(f.cancelled() or f.done() for f in futures)


def test_progress_starts_after_the_compile_warm_up(source, tmp_path, caplog, monkeypatch):
    src, _ = source
    events = {}
    real_warm_up, real_encode = convert.warm_up, convert.encode

    def warm_up(formats, pool):
        events["formats"] = formats
        result = real_warm_up(formats, pool)
        events["warm"] = time.time()
        return result

    def encode(plan, pool, bar):
        events["bar"] = bar.start_t  # tqdm's clock (time.time) starts when the bar is made: its rate counts from there
        return real_encode(plan, pool, bar)

    monkeypatch.setattr(convert, "warm_up", warm_up)
    monkeypatch.setattr(convert, "encode", encode)
    with caplog.at_level("INFO", logger="engine.convert"):
        convert.convert(src, tmp_path / "k.gguf", "Q4_K_M", workers=1, progress=True)
    assert "compiling the Q4_K/Q5_K quantizers in this process" in caplog.text
    assert "s of it compiling;" in caplog.text  # the final rate leaves the compile out too
    assert events["formats"] == ["Q4_K", "Q5_K"] and events["bar"] >= events["warm"]


def test_default_output_name(source, tmp_path):
    src, _ = source
    assert convert.default_output(src, "Q4_K_S") == src.with_name("tiny-flux-Q4_K_S.gguf")


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine.convert", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_errors(tmp_path):
    result = _cli(tmp_path / "x.safetensors", "--type", "Q4_K")
    assert result.returncode == 2
    assert "invalid choice: 'Q4_K'" in result.stderr and "Q4_K_S" in result.stderr and "IQ4_XS" in result.stderr

    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    result = _cli(bogus, "--type", "q4_k_s", "--out", tmp_path / "o.gguf")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {bogus}:") and "Traceback" not in result.stderr

    result = _cli(tmp_path / "missing.safetensors", "--type", "Q8_0")
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr
    assert _listing(tmp_path) == ["bogus.safetensors"]
