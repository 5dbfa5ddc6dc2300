"""`python -m bench.convert` runs end to end on a tiny case (its numbers are not checked: benchmarks, not tests)."""

from bench import convert as bench_convert


def test_bench_convert_smoke(capsys):
    bench_convert.main(["--types", "Q4_0", "--shapes", "64x256", "--chunks", "1", "--workers", "2"])
    printed = capsys.readouterr().out
    assert "| Q4_0 | 64×256 |" in printed
    assert "| Q4_0 | Q4_0 / Q4_0 |" in printed  # the projected Flux-dev time of the Q4_0 preset
