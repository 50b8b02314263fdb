"""Which CPU cores each process of a local cluster may run on (`epserve up --pin-cores`).

The processes that run torch — prefill and decode instances, then expert workers — each get
one core, dealt round-robin over the cores this process may use, attention instances first so
that with as many cores as instances no two of them share one. A pinned process keeps its
caches warm and is never migrated mid-step; the price is that a busy core cannot lend its
process to an idle one, so on a machine with fewer cores than torch processes it may as well
cost as gain: `bench_cluster --pin-cores` measures it side by side. The control plane
(scheduler, ledger, routers, NATS, link proxies) stays free to run wherever a core is idle.

The plan goes to each process through the environment (common/cpu_cores.py applies it before
any thread starts). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable

_PINNED_ORDER = ("prefill-", "decode-", "expert-worker-")


def plan_cores(names: Iterable[str], cores: Iterable[int]) -> dict[str, int]:
    """name -> core for every torch process in `names` (others are left out: unpinned)."""
    cores = sorted(set(cores))
    if not cores:
        raise ValueError("no CPU cores to pin to")
    names = list(names)
    pinned = [n for prefix in _PINNED_ORDER for n in names if n.startswith(prefix)]
    return {name: cores[i % len(cores)] for i, name in enumerate(pinned)}
