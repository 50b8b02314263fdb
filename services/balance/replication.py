"""How many replicas each logical expert gets.

Greedy water-filling: every extra slot goes to the expert whose per-replica load is highest.
For the objective max_e load_e / replicas_e this greedy is optimal (each step lowers the current
maximum as far as one slot can), so it is the lower envelope the packing then works against.
"""

from __future__ import annotations

import heapq

import numpy as np


def water_fill_replicas(
    loads: np.ndarray, num_slots: int, max_replicas: int | None = None
) -> np.ndarray:
    """Replica count per expert [E]: each >= 1, summing to num_slots.

    `max_replicas` caps any expert (more replicas than workers cannot spread its load further);
    the cap is lifted when the slots cannot be filled under it. Ties go to the expert with fewer
    replicas, then the lower id, so all-idle experts are replicated round-robin.
    """
    loads = np.asarray(loads, dtype=np.float64)
    num_experts = loads.size
    if num_experts == 0:
        raise ValueError("no experts to replicate")
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    if np.any(loads < 0) or not np.all(np.isfinite(loads)):
        raise ValueError("expert loads must be finite and >= 0")
    if max_replicas is None or max_replicas * num_experts < num_slots:
        max_replicas = num_slots  # effectively uncapped
    counts = np.ones(num_experts, dtype=np.int64)
    heap = [(-float(loads[e]), 1, e) for e in range(num_experts)]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        while True:
            _, count, expert = heapq.heappop(heap)
            if count < max_replicas:
                break
        count += 1
        counts[expert] = count
        heapq.heappush(heap, (-float(loads[expert]) / count, count, expert))
    return counts
