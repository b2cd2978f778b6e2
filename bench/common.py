"""Helpers shared by the benchmarks: timing, tables, JSON results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeats: int = 1):
    """Best wall time of ``repeats`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def report(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print ``rows`` as a table and write them to ``bench/results/<name>.json``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=name)
    cols = list(rows[0]) if rows else []
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"name": name, "machine": machine(), "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2))
    return path
