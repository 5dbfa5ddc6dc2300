"""Which Triton method runs a `quant_linear` call on a GPU, decided by tables measured on that GPU.

The two methods: "fused" (the dequant-matmul kernels: split-K for M <= 16, tensor-core GEMM above) and
"dequant_matmul" (decode the weight into a reusable scratch buffer with the dequantize kernel, then torch.matmul).
`python -m bench.kernels --write-dispatch` times both for every (format, M bucket) on the GPU it runs on and writes
`kernels/dispatch_tables/<gpu>.json`; `quant_linear` follows the table of its GPU. Where no table has been measured,
the fused kernels run.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from kernels import state

METHODS = ("fused", "dequant_matmul")
M_BUCKETS = (1, 16, 512, 4096)  # a call with M rows falls in the first bucket >= M (the last for larger M)
TABLE_DIR = Path(__file__).parent / "dispatch_tables"


def m_bucket(M: int) -> int:
    return next((bound for bound in M_BUCKETS if M <= bound), M_BUCKETS[-1])


def table_path(device_name: str) -> Path:
    return TABLE_DIR / (re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() + ".json")


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict[str, str]:
    path = table_path(device_name)
    return json.loads(path.read_text())["methods"] if path.exists() else {}


def method(fmt: str, M: int, device_name: str) -> str:
    return load_table(device_name).get(f"{fmt}@{m_bucket(M)}", "fused")


def method_for(fmt: str, M: int, device: torch.device) -> str:
    """The method for one quant_linear call (on its hot path: the device's name is looked up once)."""
    if device.type != "cuda":
        return "fused"
    return method(fmt, M, state.device_name(device))


def write_table(device_name: str, methods: dict[str, str], source: str) -> Path:
    """Store `{"<format>@<M bucket>": method}` measured on `device_name`; `source` says how (the bench command)."""
    unknown = {m for m in methods.values() if m not in METHODS}
    if unknown:
        raise ValueError(f"unknown dispatch methods {sorted(unknown)}; known: {METHODS}")
    path = table_path(device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device_name, "source": source, "methods": dict(sorted(methods.items()))},
                               indent=1) + "\n")
    load_table.cache_clear()
    return path
