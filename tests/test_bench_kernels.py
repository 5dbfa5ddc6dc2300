"""bench.kernels: pytest-benchmark entries for CI-sized quant_linear cases, and a smoke test of the benchmark CLI.

Without a GPU tests/conftest.py sets TRITON_INTERPRET=1, so quant_linear on CPU tensors runs Triton's interpreter:
the cases stay tiny and few rounds, and nothing here asserts on speed (pytest-benchmark only reports). pytest.ini
disables the timing by default (each entry runs once, as a test); `--benchmark-enable` times them and prints the table.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import kernels as bench_kernels
from kernels.quant_linear import quant_linear
from kernels.triton.ops import interpreting

ON_CUDA = torch.cuda.is_available() and not interpreting()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPE = torch.bfloat16  # the benchmark's activations
ROUNDS = 50 if ON_CUDA else 2
N, K, M = 256, 512, 16


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
@pytest.mark.parametrize("path", ["quant_linear", "dequant_matmul"])
def test_benchmark_tiny_linear(benchmark, fmt, path):
    weight = bench_kernels.make_weight(fmt, K, N, DEVICE)
    x = torch.randn((M, K), dtype=DTYPE, device=DEVICE)
    if path == "quant_linear":
        def call():
            out = quant_linear(x, weight)
            _sync()
            return out
    else:
        def call():
            out = F.linear(x, weight.dequantize(DTYPE))
            _sync()
            return out
    out = benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert out.shape == (M, N) and out.dtype == DTYPE


def test_make_weight_repeats_a_quantized_tile():
    weight = bench_kernels.make_weight("Q4_0", 64, 600, torch.device("cpu"))
    assert weight.shape == (600, 64) and weight.raw.shape == (600, 2 * 18)
    assert torch.equal(weight.raw[:344], weight.raw[256:600])
    assert torch.isfinite(weight.dequantize()).all()


def test_shapes_are_fluxs_layers():
    assert bench_kernels.SHAPES["qkv"] == (3072, 9216)
    assert bench_kernels.SHAPES["linear2"] == (15360, 3072)
    assert bench_kernels.parse_shape("512x256") == ("512x256", 512, 256)
    assert bench_kernels.parse_shape("mlp_out") == ("mlp_out", 12288, 3072)
    with pytest.raises(ValueError, match="unknown shape"):
        bench_kernels.parse_shape("mlp")


def test_table_cells_without_timing():
    row = dict(format="Q4_K", shape="proj", K=3072, N=3072, M=16, path="torch", ms=2.5, tflops=0.12,
               weight_gbps=2.1, bf16_ms=1.25, dequant_ms=2.5, scratch_ms=None, compiled_ms=2.0,
               speedup_vs_bf16=0.5, speedup_vs_dequant=1.0, speedup_compiled=1.25)
    cells = bench_kernels.table_cells(row)
    assert cells == ["Q4_K", "proj (3072→3072)", "16", "torch", "2.50", "0.120", "2.10", "1.25", "2.50", "—", "2.00",
                     "0.50×", "1.00×", "1.25×"]
    assert len(cells) == len(bench_kernels.COLUMNS)


def test_refuses_the_interpreter_without_the_test_flag(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exit_info:
        bench_kernels.main(["--device", "cpu", "--formats", "Q8_0", "--shapes", "512x256", "--m", "1"])
    assert exit_info.value.code == 2
    assert "interpreter" in capsys.readouterr().err


def test_main_smoke(tmp_path, capsys):
    out_csv = tmp_path / "kernels.csv"
    device = "cuda" if ON_CUDA else "cpu"
    rows = bench_kernels.main(["--device", device, "--formats", "Q8_0,Q4_K", "--shapes", "512x256", "--m", "1",
                               "--repeats", "1", "--csv", str(out_csv), "--allow-interpreter"])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| format"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns == ["format", "shape", "M", "path", "time (ms)", "TFLOP/s", "GB/s (weight)", "bf16 matmul (ms)",
                       "dequant+matmul (ms)", "triton dequant+matmul (ms)", "compiled (ms)", "vs bf16 matmul",
                       "vs dequant+matmul", "compiled vs eager"]
    table = [line for line in printed.splitlines() if line.startswith("| Q")]
    assert [line.split("|")[1].strip() for line in table] == ["Q8_0", "Q4_K"]
    if not ON_CUDA:
        assert bench_kernels.CPU_NOTE in printed
    assert [row["path"] for row in rows] == (["triton gemv"] * 2 if ON_CUDA else
                                             ["triton interpreter" if interpreting() else "torch"] * 2)
    with open(out_csv, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [(r["format"], r["K"], r["N"], r["M"]) for r in written] == [("Q8_0", "512", "256", "1"),
                                                                         ("Q4_K", "512", "256", "1")]
    assert all(float(r["ms"]) > 0 and float(r["speedup_vs_dequant"]) > 0 and float(r["compiled_ms"]) > 0
               for r in written)


def test_dispatch_methods_pick_the_faster_triton_method_per_format_and_m_bucket():
    def row(fmt, M, fused, scratch):
        return dict(format=fmt, M=M, ms=fused, scratch_ms=scratch)

    rows = [row("Q4_K", 1, 0.1, 0.3), row("Q4_K", 4096, 2.0, 1.0), row("Q4_K", 4608, 2.0, 1.5),
            row("Q8_0", 512, 1.0, 0.9), row("Q8_0", 512, 1.0, 1.5), row("Q6_K", 16, 1.0, None)]
    assert bench_kernels.dispatch_methods(rows) == {"Q4_K@1": "fused", "Q4_K@4096": "dequant_matmul",
                                                    "Q8_0@512": "fused"}


def test_write_dispatch_needs_cuda():
    if ON_CUDA:
        pytest.skip("on a GPU --write-dispatch is allowed")
    with pytest.raises(SystemExit):
        bench_kernels.main(["--device", "cpu", "--write-dispatch", "--allow-interpreter"])


def test_a_plain_test_run_prints_no_benchmark_table():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_bench_kernels.py::test_benchmark_tiny_linear[dequant_matmul-Q8_0]"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "benchmark:" not in result.stdout and "Name (time in" not in result.stdout
