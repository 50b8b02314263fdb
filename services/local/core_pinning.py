"""Which CPU cores each process of a local cluster may run on (`epserve up --pin-cores`).

The processes that run torch — prefill and decode instances, then expert workers — each get
one core, dealt round-robin over the cores this process may use, attention instances first so
that with as many cores as instances no two of them share one. A pinned process keeps its
caches warm and is never migrated mid-step; the price is that a busy core cannot lend its
process to an idle one, so on a machine with fewer cores than torch processes it may as well
cost as gain: `bench_cluster --pin-cores` measures it side by side. The control plane
(scheduler, ledger, routers, NATS, link proxies) stays free to run wherever a core is idle.

A process is pinned through the environment (CPU_CORES_ENV), applied as the first thing
`epserve` does (`apply_from_env`), before any thread exists, so every thread it starts later
(gRPC's, torch's, the compute thread) inherits the mask. Pure apart from `apply_from_env`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

CPU_CORES_ENV = "EPSERVE_CPU_CORES"
_PINNED_ORDER = ("prefill-", "decode-", "expert-worker-")


def plan_cores(names: Iterable[str], cores: Iterable[int]) -> dict[str, int]:
    """name -> core for every torch process in `names` (others are left out: unpinned)."""
    cores = sorted(set(cores))
    if not cores:
        raise ValueError("no CPU cores to pin to")
    names = list(names)
    pinned = [n for prefix in _PINNED_ORDER for n in names if n.startswith(prefix)]
    return {name: cores[i % len(cores)] for i, name in enumerate(pinned)}


def parse_cores(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3]."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"{CPU_CORES_ENV}: {text!r} is not a core list such as 0,2-3")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def apply_from_env(env: Mapping[str, str] = os.environ) -> list[int] | None:
    """Pins this process to the cores CPU_CORES_ENV names (None when it names none)."""
    text = env.get(CPU_CORES_ENV, "")
    if not text.strip():
        return None
    cores = parse_cores(text)
    os.sched_setaffinity(0, cores)
    return cores
