"""The benchmarks' command lines: usage names the module to run, every flag has help, arguments are read as the README
writes them, and results already on disk are not overwritten unless named."""

import argparse
import importlib

import numpy as np
import pytest
import torch

from bench import codecs as bench_codecs
from bench import compile_check
from bench import kernels as bench_kernels
from kernels import torch_codecs
from kernels.formats import get_format

BENCHMARKS = ["codecs", "compile_check", "convert", "kernels", "memory", "model_error", "sass", "text_encoders"]


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("name", BENCHMARKS)
def test_usage_and_help(name, monkeypatch):
    def parse_args(parser, *args, **kwargs):  # stop main() right after it has built its parser
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Parsed) as info:
        importlib.import_module(f"bench.{name}").main([])
    parser = info.value.args[0]
    assert parser.prog == f"python -m bench.{name}"
    assert parser.format_usage().startswith(f"usage: python -m bench.{name} ")
    missing = [a.option_strings for a in parser._actions if not a.help]
    assert missing == []


@pytest.mark.parametrize("text, archs", [("sm_89", (89,)), ("89", (89,)), ("sm_80,86,SM_90", (80, 86, 90))])
def test_compile_check_archs(text, archs):
    assert compile_check.parse_archs(text) == archs


@pytest.mark.parametrize("text", ["sm_75", "sm_89a", "ampere", ""])
def test_compile_check_unknown_arch(text, capsys):
    with pytest.raises(SystemExit) as info:
        compile_check.main(["--archs", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown architecture" in err and "sm_80, sm_86, sm_89, sm_90" in err and "Traceback" not in err


def test_compile_check_layouts(capsys):
    planes = list(compile_check.jobs((90,), ["Q4_K"], layouts=("planes",)))
    assert planes and {job[5] for job in planes} == {"planes"}
    with pytest.raises(SystemExit) as info:
        compile_check.main(["--layouts", "planes,tiles"])
    assert info.value.code == 2 and "unknown layout" in capsys.readouterr().err


def test_kernels_keeps_existing_results_unless_named(tmp_path, monkeypatch, capsys):
    existing = tmp_path / "kernels-cpu-2core.csv"
    existing.write_text("committed\n")
    monkeypatch.setattr(bench_kernels, "default_csv_path", lambda device: existing)
    argv = ["--device", "cpu", "--formats", "Q8_0", "--shapes", "512x256", "--m", "1", "--repeats", "1",
            "--allow-interpreter"]
    with pytest.raises(SystemExit) as info:
        bench_kernels.main(argv)
    assert info.value.code == 2
    assert f"{existing} exists; pass --csv {existing}" in capsys.readouterr().err
    assert existing.read_text() == "committed\n"

    bench_kernels.main([*argv, "--csv", str(existing)])  # asked for by name: replaced
    assert existing.read_text().startswith("format,shape,K,N,M")
    assert f"CSV: {existing}\n" in capsys.readouterr().out


def test_kernels_default_csv_is_where_help_says(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        bench_kernels.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    path = bench_kernels.default_csv_path(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert f"here {path.relative_to(bench_kernels.REPO)};" in help_text.replace("- ", "-")


def test_paths_are_shown_relative_to_the_repo(tmp_path):
    assert bench_kernels.shown(bench_kernels.REPO / "bench" / "results" / "x.csv") == "bench/results/x.csv"
    assert bench_kernels.shown(tmp_path / "x.csv") == str(tmp_path / "x.csv")


def test_codecs_warm_up_runs_at_the_measured_size(monkeypatch):
    shapes = []
    real = torch_codecs.quantize

    def recording(x, fmt):
        shapes.append(tuple(x.shape))
        return real(x, fmt)

    monkeypatch.setattr(torch_codecs, "quantize", recording)
    data = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32))
    bench_codecs.measure(torch_codecs, get_format("Q4_K"), "quantize", data, lambda: None)
    assert len(shapes) >= 2 and set(shapes) == {(64, 256)}  # the warm-up call included


def test_format_names_in_any_case():  # as typed on the command lines: --formats q4_k, --types iq4_nl
    assert get_format("q4_k") is get_format("Q4_K")
    assert get_format("iq4_nl").name == "IQ4_NL" and get_format("f8_e4m3").name == "F8_E4M3"
    for bad in ("q4_z", None, ["Q4_K"]):
        with pytest.raises(ValueError, match="unknown weight format"):
            get_format(bad)


def test_bench_pipeline_times_the_compiled_model(capsys):
    from bench.pipeline import main

    main(["--presets", "BF16", "--steps", "3", "--compile"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| BF16 "))
    compiled, ratio = (float(cell) for cell in row.strip(" |").split("|")[-2:])
    eager = float(row.split("|")[2])
    # the ratio is printed to 2 decimals, the times to 4: half a unit of the ratio's last digit, plus what rounding
    # each time by half a unit of its last digit does to their quotient (milliseconds-long steps: up to 1%)
    rounding = 0.005 + compiled / eager * (0.00005 / compiled + 0.00005 / eager)
    assert compiled > 0 and ratio == pytest.approx(compiled / eager, abs=rounding + 1e-9)
