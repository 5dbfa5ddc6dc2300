"""Mutated model files: every outcome is a loaded checkpoint or one ModelFileError, never a crash, hang or a
different exception."""

import random
import signal
import struct

import pytest
import torch
from safetensors.torch import save_file

from engine import ModelFileError
from engine.checkpoints import load_checkpoint
from tests.flux_fixtures import tiny_flux
from tests.test_checkpoints import write_city96_gguf

CASES_PER_FORMAT = 200
SECONDS_PER_CASE = 10
SPECIAL_INTEGERS = (0, 1, 2, 3, 31, 32, 255, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 63, (1 << 64) - 1)


def header_length(raw: bytes, kind: str) -> int:
    if kind == "safetensors":
        return 8 + int.from_bytes(raw[:8], "little")
    return raw.index(b"final_layer.linear.bias") + 64  # past the last tensor info


def mutations(raw: bytes, kind: str, rng: random.Random):
    """Byte flips in the header, truncations, and header integers replaced by edge values."""
    header = header_length(raw, kind)
    for case in range(CASES_PER_FORMAT):
        data = bytearray(raw)
        kind_of_change = case % 3
        if kind_of_change == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(header)] = rng.randrange(256)
        elif kind_of_change == 1:
            del data[rng.randrange(len(data)):]
        else:
            at = rng.randrange(header - 8)
            width = rng.choice((4, 8))
            value = rng.choice(SPECIAL_INTEGERS) % (1 << (8 * width))
            data[at:at + width] = value.to_bytes(width, "little")
        yield case, bytes(data)


def timeout_handler(signum, frame):
    raise TimeoutError("loading a mutated file hung")


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_mutated_files_fail_cleanly(tmp_path, kind):
    sd = tiny_flux(hidden=256, heads=2, context=256, vec=256, depth=1, depth_single=1)
    path = tmp_path / f"flux.{kind}"
    if kind == "gguf":
        write_city96_gguf(path, sd, "Q4_K", "F32")
    else:
        save_file(sd, path)
    raw = path.read_bytes()
    assert isinstance(load_checkpoint(path), dict)
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "ModelFileError": 0}
    previous = signal.signal(signal.SIGALRM, timeout_handler)
    try:
        for case, data in mutations(raw, kind, rng):
            mutated = tmp_path / f"case{case}.{kind}"
            mutated.write_bytes(data)
            signal.alarm(SECONDS_PER_CASE)
            try:
                load_checkpoint(mutated)
                outcomes["loaded"] += 1
            except ModelFileError as e:
                assert str(mutated) in str(e)
                outcomes["ModelFileError"] += 1
            finally:
                signal.alarm(0)
            mutated.unlink()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["ModelFileError"] >= CASES_PER_FORMAT // 3, outcomes
