"""bench.model_error on a hand-made CSV and hand-made SASS rows: the ratios are measured over the model's times."""

import csv
import json

import pytest

from bench import model_error, sass

COLUMNS = ["format", "shape", "K", "N", "M", "path", "ms", "tflops", "weight_gbps", "bf16_ms", "dequant_ms",
           "scratch_ms", "compiled_ms", "speedup_vs_bf16", "speedup_vs_dequant", "speedup_compiled", "device"]


def sass_rows(cc=90):
    planes = sass.kernel_layout("Q8_0")
    return [dict(kernel="bf16", format="BF16", cc=cc, layout="blocks", block_m=128, clocks_per_element=1.0),
            dict(kernel="qmm", format="Q8_0", cc=cc, layout=planes, block_m=128, clocks_per_element=2.0),
            dict(kernel="qmm", format="Q8_0", cc=cc, layout=planes, block_m=256, clocks_per_element=3.0),
            dict(kernel="qmv", format="Q8_0", cc=cc, layout=planes, block_m=16, clocks_per_element=4.0),
            dict(kernel="gemv", format="Q8_0", cc=cc, layout=planes, block_m=0, clocks_per_element=30.0),
            dict(kernel="dequant", format="Q8_0", cc=cc, layout=planes, block_m=0, clocks_per_element=9.0),
            dict(kernel="qmv", format="Q8_0", cc=cc, layout="blocks", block_m=16, clocks_per_element=0.0)]


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in COLUMNS})


def test_ratios_are_measured_over_the_model(tmp_path, capsys):
    gpu = sass.GPUS["H200 SXM"]
    model = sass.LaunchModel(sass_rows(), gpu)
    K, N = 3072, 9216
    measured = []
    for M, factor in ((1, 2.0), (16, 0.5), (4608, 1.0)):
        _, fused = model.fused("Q8_0", M, K, N)
        measured.append(dict(format="Q8_0", shape="qkv", K=K, N=N, M=M, path="triton fused", ms=factor * fused,
                             bf16_ms=3 * model.bf16_ms(M, K, N), scratch_ms=model.dequant_matmul_ms("Q8_0", M, K, N),
                             device="NVIDIA H200"))
    measured.append(dict(measured[0], path="torch", device="cpu"))  # the CPU's torch path: not a kernel timing
    write_csv(tmp_path / "kernels.csv", measured)
    (tmp_path / "rows.json").write_text(json.dumps(sass_rows()))

    errors = list(model_error.error_rows(model_error.measured_rows(tmp_path / "kernels.csv"), model))
    assert [(e[2], e[3]) for e in errors] == [(1, "gemv"), (16, "split-k"), (4608, "gemm")]
    assert [e[4][2] for e in errors] == pytest.approx([2.0, 0.5, 1.0])  # fused: the factor it was measured at
    assert [e[5][2] for e in errors] == pytest.approx([1.0] * 3)  # dequantize + matmul as modelled
    assert [e[6][2] for e in errors] == pytest.approx([3.0] * 3)  # bf16 three times slower than modelled
    # M = 1 runs the FMA GEMV: 30 clocks a weight element over 132 SMs x 128 lanes x 1.83 GHz, or memory if longer
    weight_bytes = 34 * K // 32 * N
    assert errors[0][4][1] == pytest.approx(1e3 * max(30 * K * N / (132 * 128 * 1.83e9), weight_bytes / 4.8e12),
                                            rel=1e-3)
    summary = model_error.summary(errors)
    assert summary["bf16 matmul"] == (3, pytest.approx(3.0), pytest.approx(3.0), pytest.approx(3.0))

    model_error.main(["--csv", str(tmp_path / "kernels.csv"), "--rows", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert "over the H200 SXM model" in out and "| fused gemv | 1 | 2.00 | 2.00 | 2.00 |" in out


def test_rows_default_to_the_committed_file_of_the_gpus_architecture(tmp_path, monkeypatch, capsys):
    (tmp_path / "sass-sm80-86-89.json").write_text(json.dumps(sass_rows(cc=80)))
    (tmp_path / "sass-sm90.json").write_text(json.dumps(sass_rows(cc=90)))
    monkeypatch.setattr(model_error, "RESULTS", tmp_path)
    write_csv(tmp_path / "kernels.csv", [dict(format="Q8_0", shape="proj", K=3072, N=3072, M=16, path="triton fused",
                                              ms=1.0, bf16_ms=1.0, device="NVIDIA A100-SXM4-80GB")])
    model_error.main(["--csv", str(tmp_path / "kernels.csv")])
    assert "over the A100 SXM 80GB model (sass-sm80-86-89.json)" in capsys.readouterr().out
    (tmp_path / "sass-sm80-86-89.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        model_error.main(["--csv", str(tmp_path / "kernels.csv")])
    assert exit_info.value.code == 2 and "no sm_80 rows" in capsys.readouterr().err


@pytest.mark.parametrize("name, gpu", [("NVIDIA H200", "H200 SXM"), ("NVIDIA H100 80GB HBM3", "H100 SXM"),
                                       ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
                                       ("NVIDIA GeForce RTX 4060 Ti", "RTX 4060 Ti"),
                                       ("NVIDIA GeForce RTX 4090", "RTX 4090")])
def test_device_names_find_their_model(name, gpu):
    assert sass.gpu_of_device(name) == gpu


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    write_csv(tmp_path / "cpu.csv", [dict(format="Q8_0", shape="proj", K=3072, N=3072, M=1, path="torch", ms=1.0,
                                          bf16_ms=1.0, device="cpu")])
    with pytest.raises(SystemExit) as exit_info:
        model_error.main(["--csv", str(tmp_path / "cpu.csv")])
    assert exit_info.value.code == 2 and "no Triton timings" in capsys.readouterr().err
    write_csv(tmp_path / "odd.csv", [dict(format="Q8_0", shape="proj", K=3072, N=3072, M=1, path="triton gemv",
                                          ms=1.0, bf16_ms=1.0, device="Some Accelerator")])
    with pytest.raises(SystemExit) as exit_info:
        model_error.main(["--csv", str(tmp_path / "odd.csv")])
    assert exit_info.value.code == 2 and "no model of 'Some Accelerator'" in capsys.readouterr().err


def test_the_integer_gemv_is_told_apart():
    """Its timings hold the launch rounding x, which the model leaves out: reported on a line of its own."""
    assert [model_error._kernel_name(1, fmt) for fmt in ("Q8_0", "Q2_K", "IQ4_XS", "NF4")] == \
        ["gemv", "gemv int", "gemv int", "split-k"]
    assert model_error._kernel_name(16, "Q2_K") == "split-k"
