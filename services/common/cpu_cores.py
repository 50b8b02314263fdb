"""CPU core lists ('0,2-3') and pinning a process to one (`epserve up --pin-cores`, an expert
worker's `--cpu-cores`).

A process is pinned through the environment (CPU_CORES_ENV), applied as the first thing
`epserve` does (`apply_from_env`), before any thread exists, so every thread it starts later
(gRPC's, torch's, the compute thread) inherits the mask.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CPU_CORES_ENV = "EPSERVE_CPU_CORES"


def parse_cores(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3]."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a core list such as 0,2-3")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def apply_from_env(env: Mapping[str, str] = os.environ) -> list[int] | None:
    """Pins this process to the cores CPU_CORES_ENV names (None when it names none)."""
    text = env.get(CPU_CORES_ENV, "")
    if not text.strip():
        return None
    try:
        cores = parse_cores(text)
    except ValueError as exc:
        raise ValueError(f"{CPU_CORES_ENV}: {exc}") from exc
    os.sched_setaffinity(0, cores)
    return cores
