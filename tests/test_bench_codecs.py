"""bench.codecs' comparison with ComfyUI-GGUF: the re-implemented baseline decodes the formats it claims (so the
comparison times real work), and the table runs. Nothing here asserts on speed."""

import numpy as np
import pytest
import torch

from bench import codecs as bench_codecs
from bench import comfyui_gguf_baseline
from kernels import reference
from kernels.formats import get_format


@pytest.mark.parametrize("name", comfyui_gguf_baseline.FORMATS_COVERED)
def test_baseline_decodes_within_fp16_rounding(name):
    fmt = get_format(name)
    x = (np.random.default_rng(1).standard_normal((4, 2 * max(fmt.block_size, 256))) * 0.02).astype(np.float32)
    raw = reference.quantize(x, name)
    expected = reference.dequantize(raw, name)
    actual = comfyui_gguf_baseline.dequantize(torch.from_numpy(raw), name, torch.float32).numpy()
    assert actual.shape == expected.shape
    # fp16 arithmetic: each product (and the min's subtraction) rounded to fp16, relative to the largest value
    assert np.abs(actual - expected).max() <= 2e-3 * np.abs(expected).max()


def test_comfyui_table_runs(capsys, monkeypatch):
    monkeypatch.setattr(bench_codecs, "TIME_BUDGET_S", 0.0)
    bench_codecs.main(["--tables", "comfyui", "--formats", "Q4_K,NF4,F16", "--rows", "2", "--cols", "256"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4].startswith("| format | ComfyUI-GGUF → f32 | ours → f32 | speed-up")
    assert [line.split(" | ")[0] for line in lines[-2:]] == ["| Q4_K", "| F16"]  # NF4 is not a GGUF format


def test_unknown_table_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        bench_codecs.main(["--tables", "speed"])
    assert info.value.code == 2 and "choose from codecs, comfyui" in capsys.readouterr().err
