"""bench/results.json: the figures each benchmark measured side by side, by benchmark.

Benchmarks `record()` what they print; `make bench` (run_all) writes the file at the end,
merged with what an earlier run recorded for benchmarks this run skipped (`--only`).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS: dict[str, dict[str, float | str]] = {}
DEFAULT_PATH = Path(__file__).with_name("results.json")


def record(benchmark: str, name: str, value: float | str) -> None:
    RESULTS.setdefault(benchmark, {})[name] = value


def write(path: Path = DEFAULT_PATH) -> Path:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("benchmarks", {}).update(RESULTS)
    doc["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc["machine"] = f"{platform.machine()}, {platform.python_version()}"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path
