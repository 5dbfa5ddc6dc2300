"""The README's memory table: modulation precompute leaves at most 75% of the stored transformer on the GPU."""

import pytest

from bench.memory import memory_table
from flux_model import FluxConfig

PUBLISHED_DEV_GB = {"Q8_0": 12.7, "Q5_1": 9.01, "Q5_0": 8.27, "Q4_1": 7.53, "Q4_0": 6.79, "F16": 23.8}


@pytest.mark.parametrize("config", [FluxConfig.dev(), FluxConfig.schnell()])
def test_resident_weights_at_most_three_quarters_of_the_file(config):
    for row in memory_table(config, cards=()):
        assert row["ratio"] <= 0.75, row


def test_stored_sizes_match_published_legacy_files():
    # city96's FLUX.1-dev files whose leftovers are F16 (the _0/_1 and F16 presets), in GB as the hub lists them
    rows = {row["preset"]: row for row in memory_table(FluxConfig.dev(), cards=())}
    for preset, gb in PUBLISHED_DEV_GB.items():
        assert abs(rows[preset]["file_gb"] - gb) < 0.01 + 0.002 * gb, (preset, rows[preset]["file_gb"])
