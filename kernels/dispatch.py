"""Which Triton method runs a `quant_linear` call on a GPU: a table measured on that GPU where there is one, else the
static cost model's choice.

The two methods: "fused" (the dequant-matmul kernels: split-K for M <= 16, tensor-core GEMM above) and
"dequant_matmul" (decode the weight into a reusable scratch buffer with the dequantize kernel, then torch.matmul).
`python -m bench.kernels --write-dispatch` times both for every (format, M bucket) on the GPU it runs on and writes
the table to the user's cache directory (`$XDG_CACHE_HOME/flux-quant-engine/dispatch/<gpu>.json`: the installed
package may be read-only); tables shipped in `kernels/dispatch_tables/` are only read. An entry of the user's table
wins over the shipped one; where neither has the (format, M bucket), `default_method` decides: the static cost
model's choice per (format, M bucket) for the GPU's architecture, written by `python -m bench.sass
--write-static-dispatch` into `kernels/dispatch_tables/static-model-sm<cc>.json`, else one rule for every format.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

from kernels import state

METHODS = ("fused", "dequant_matmul")
M_BUCKETS = (1, 16, 512, 4096)  # a call with M rows falls in the first bucket >= M (the last for larger M)
FUSED_UP_TO = 16  # the static model's default: the fused kernels (the split-K GEMV) up to this many rows
SHIPPED_DIR = Path(__file__).parent / "dispatch_tables"


def user_table_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "flux-quant-engine" / "dispatch"


def m_bucket(M: int) -> int:
    return next((bound for bound in M_BUCKETS if M <= bound), M_BUCKETS[-1])


def table_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() + ".json"


def static_table_name(cc: int) -> str:
    return f"static-model-sm{cc}.json"  # no GPU's name slugs to this


def default_method(fmt: str, M: int, cc: int | None = None) -> str:
    """The method without a measured table: the static model's choice for (format, M bucket) on architecture `cc`
    (90 for sm_90; `python -m bench.sass --write-static-dispatch`), else for M <= 16 the fused split-K GEMV, which
    reads only the quantized bytes, and above, decoding once into scratch + torch's matmul, which the model prefers
    wherever the fused GEMM's decode costs more issue slots than its tensor-core work (bench/results/sass-*.md)."""
    table = static_table(cc) if cc is not None else {}
    return table.get(f"{fmt}@{m_bucket(M)}") or ("fused" if m_bucket(M) <= FUSED_UP_TO else "dequant_matmul")


@functools.lru_cache(maxsize=None)
def static_table(cc: int) -> dict[str, str]:
    return _read(SHIPPED_DIR / static_table_name(cc))


def _read(path: Path) -> dict[str, str]:
    return json.loads(path.read_text())["methods"] if path.exists() else {}


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict[str, str]:
    """The measured entries for `device_name`: the shipped table's, overridden by the user's."""
    return _read(SHIPPED_DIR / table_name(device_name)) | _read(user_table_dir() / table_name(device_name))


def method(fmt: str, M: int, device_name: str, cc: int | None = None) -> str:
    """The method on the GPU `device_name` of architecture `cc`: its measured table's entry, else the default."""
    return load_table(device_name).get(f"{fmt}@{m_bucket(M)}") or default_method(fmt, M, cc)


def method_for(fmt: str, M: int, device: torch.device) -> str:
    """The method for one quant_linear call (on its hot path: the device's name is looked up once). Off CUDA (the
    interpreter) the fused kernels, which is what the tests check there."""
    if device.type != "cuda":
        return "fused"
    return method(fmt, M, state.device_name(device), state.compute_capability(device))


def _write(path: Path, content: dict) -> Path:
    unknown = {m for m in content["methods"].values() if m not in METHODS}
    if unknown:
        raise ValueError(f"unknown dispatch methods {sorted(unknown)}; known: {METHODS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**content, "methods": dict(sorted(content["methods"].items()))}, indent=1) + "\n")
    load_table.cache_clear()
    static_table.cache_clear()
    return path


def write_table(device_name: str, methods: dict[str, str], source: str) -> Path:
    """Store `{"<format>@<M bucket>": method}` measured on `device_name` in the user's table directory; `source` says
    how (the bench command)."""
    return _write(user_table_dir() / table_name(device_name), {"device": device_name, "source": source,
                                                                "methods": methods})


def write_static_table(methods: dict[str, str], source: str, cc: int) -> Path:
    """Store the static cost model's `{"<format>@<M bucket>": method}` for architecture `cc` (shipped with the
    package)."""
    return _write(SHIPPED_DIR / static_table_name(cc), {"source": source, "methods": methods})
