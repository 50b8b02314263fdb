"""Objectives of expert placement: per-worker load and balancedness.

A token routed to a logical expert with n replicas goes to one of them, so in expectation a
replicated expert's load splits evenly over its replicas (route() spreads it that way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def worker_loads(
    phy2log_layer: Sequence[int] | np.ndarray,
    loads_layer: Sequence[float] | np.ndarray,
    num_workers: int,
) -> np.ndarray:
    """Load on each worker [num_workers] for one layer; slot p lives on p // slots_per_worker."""
    phy2log = np.asarray(phy2log_layer, dtype=np.int64)
    loads = np.asarray(loads_layer, dtype=np.float64)
    if phy2log.ndim != 1 or loads.ndim != 1:
        raise ValueError("phy2log_layer and loads_layer must be 1-D")
    if num_workers < 1 or phy2log.size % num_workers != 0:
        raise ValueError(f"{phy2log.size} slots cannot be split evenly over {num_workers} workers")
    if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= loads.size):
        raise ValueError(f"phy2log names experts outside 0..{loads.size - 1}")
    replicas = np.bincount(phy2log, minlength=loads.size)
    if np.any(replicas == 0):
        raise ValueError(f"experts {np.flatnonzero(replicas == 0)[:8].tolist()} have no slot")
    slot_loads = loads[phy2log] / replicas[phy2log]
    return slot_loads.reshape(num_workers, -1).sum(axis=1)


def balancedness_of_loads(per_worker: np.ndarray) -> float:
    """mean / max of per-worker loads; 1.0 is perfect, and an all-idle layer counts as 1.0."""
    peak = float(np.max(per_worker))
    return 1.0 if peak <= 0 else float(np.mean(per_worker)) / peak


def balancedness(
    phy2log_layer: Sequence[int] | np.ndarray,
    loads_layer: Sequence[float] | np.ndarray,
    num_workers: int,
) -> float:
    """Mean worker load / max worker load for one layer (1.0 = perfectly balanced)."""
    return balancedness_of_loads(worker_loads(phy2log_layer, loads_layer, num_workers))


def mean_balancedness(phy2log: np.ndarray, loads: np.ndarray, num_workers: int) -> float:
    """balancedness averaged over layers; phy2log [L, slots], loads [L, experts]."""
    phy2log = np.asarray(phy2log)
    loads = np.asarray(loads, dtype=np.float64)
    if phy2log.ndim != 2 or loads.ndim != 2 or phy2log.shape[0] != loads.shape[0]:
        raise ValueError(f"phy2log {phy2log.shape} and loads {loads.shape} disagree on layers")
    values = [balancedness(p, w, num_workers) for p, w in zip(phy2log, loads, strict=True)]
    return float(np.mean(values))


def replica_bound(
    loads_layer: Sequence[float] | np.ndarray,
    replica_counts: Sequence[int] | np.ndarray,
    num_workers: int,
) -> float:
    """Best balancedness any packing of these replicas could reach.

    No worker can carry less than the mean, nor less than the heaviest single replica, so
    balancedness <= mean / max(mean, max_e load_e / replicas_e).
    """
    loads = np.asarray(loads_layer, dtype=np.float64)
    counts = np.asarray(replica_counts, dtype=np.float64)
    mean = loads.sum() / num_workers
    heaviest = float(np.max(loads / counts)) if loads.size else 0.0
    peak = max(mean, heaviest)
    return 1.0 if peak <= 0 else mean / peak
