"""The naive placement the planner is measured against: experts laid out contiguously."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.balance.metrics import balancedness
from services.balance.placement import PlacementTable

__all__ = ["balancedness", "contiguous_placement", "embedded_contiguous_layer"]


def contiguous_placement(
    num_logical: int,
    num_workers: int,
    layer_ids: Sequence[int],
    redundant: int = 0,
    loads: Sequence[Sequence[float]] | np.ndarray | None = None,
    version: int = 1,
) -> PlacementTable:
    """Slots 0..num_logical-1 hold experts 0..num_logical-1 in order; the `redundant` slots after
    them hold copies of each layer's most-loaded experts (from loads [L][E]), or of the first
    experts when no loads are given. Slot p lives on worker p // slots_per_worker."""
    if num_logical < 1 or num_workers < 1:
        raise ValueError("num_logical and num_workers must be >= 1")
    if redundant < 0:
        raise ValueError(f"redundant must be >= 0, got {redundant}")
    num_slots = num_logical + redundant
    if num_slots % num_workers != 0:
        raise ValueError(
            f"num_logical + redundant ({num_slots}) must be divisible by num_workers "
            f"({num_workers})"
        )
    layer_ids = tuple(layer_ids)
    if loads is None:
        ranked = [np.arange(num_logical)] * len(layer_ids)
    else:
        loads_arr = np.asarray(loads, dtype=np.float64)
        if loads_arr.shape != (len(layer_ids), num_logical):
            raise ValueError(
                f"loads must be [{len(layer_ids)} layers][{num_logical} experts], "
                f"got shape {loads_arr.shape}"
            )
        # Heaviest first; ties keep the lower expert id (stable sort of the negated loads).
        ranked = [np.argsort(-row, kind="stable") for row in loads_arr]
    phy2log = []
    for order in ranked:
        copies = np.resize(order, redundant)  # wraps around when redundant > num_logical
        phy2log.append(tuple(range(num_logical)) + tuple(int(e) for e in copies))
    return PlacementTable(version, num_workers, num_logical, layer_ids, tuple(phy2log))


def embedded_contiguous_layer(
    loads_layer: np.ndarray, num_slots: int, num_workers: int
) -> np.ndarray | None:
    """The contiguous no-redundancy layout fitted into more slots: worker w keeps its
    contiguous block of experts and fills its spare slots with copies of its own experts, so
    every worker carries exactly the load it has without redundancy. None when the experts do
    not split evenly over the workers (then no such layout exists)."""
    num_experts = loads_layer.size
    if num_experts % num_workers != 0 or num_slots % num_workers != 0:
        return None
    per_worker = num_experts // num_workers
    slots_per_worker = num_slots // num_workers
    if slots_per_worker < per_worker:
        return None
    rows = []
    for worker in range(num_workers):
        own = np.arange(worker * per_worker, (worker + 1) * per_worker)
        heaviest = own[np.argsort(-loads_layer[own], kind="stable")]
        rows.append(np.concatenate([own, np.resize(heaviest, slots_per_worker - per_worker)]))
    return np.concatenate(rows)
