"""Replicate and place the experts of one domain (all workers, or one node) onto its workers.

1. Water-fill replica counts (replication.py), capped at one replica per worker.
2. Pack the replicas onto workers, equal slots each (packing.py: LPT, then swaps).
3. Refine the counts against the packing: move one replica from the expert that misses it
   least to an expert on the heaviest worker, repack locally with swaps, keep the move if the
   heaviest workers got lighter. Water-filling is optimal for the heaviest *replica*, but the
   objective is the heaviest *worker*; when few slots per worker leave no room to even out
   (decode: 2 per GPU) a different split of the spare slots can pack better.
"""

from __future__ import annotations

import numpy as np

from services.balance.packing import bin_loads, improve_by_swaps, pack_equal_bins
from services.balance.replication import water_fill_replicas

# Refinement compares the few heaviest workers lexicographically, so a move that lightens one
# of several equally heavy workers still counts as progress instead of stalling on a plateau.
_COMPARED_WORKERS = 8
_RECEIVERS_TRIED = 3
_DONORS_TRIED = 6
_MAX_REFINE_ROUNDS = 64
_CLOSE_ENOUGH = 1e-4


def place_replicas(
    loads: np.ndarray,
    num_slots: int,
    num_workers: int,
    refine: bool = True,
    good_enough: float = 0.0,
) -> np.ndarray:
    """Logical expert (index into `loads`) of each slot [num_slots]; slot p on p // spw.

    Refinement stops once the heaviest worker is within a hair of the mean or at most
    `good_enough` (a caller placing one node of several passes the heaviest node's mean: no
    node needs to be better than the node that bounds the whole layer). Within a worker the
    slots are sorted by expert id, so the table reads naturally.
    """
    loads = np.asarray(loads, dtype=np.float64)
    if num_slots % num_workers != 0:
        raise ValueError(f"{num_slots} slots do not split evenly over {num_workers} workers")
    counts = water_fill_replicas(loads, num_slots, max_replicas=num_workers)
    labels = np.repeat(np.arange(loads.size), counts)
    bins = pack_equal_bins(loads[labels] / counts[labels], num_workers, labels)
    if refine:
        labels, bins = _refine_counts(loads, counts, labels, bins, num_workers, good_enough)
    order = np.lexsort((labels, bins))  # by worker, then by expert id
    return labels[order]


def _peak_key(worker_load: np.ndarray) -> tuple[float, ...]:
    return tuple(np.sort(worker_load)[::-1][:_COMPARED_WORKERS])


def _refine_counts(
    loads: np.ndarray,
    counts: np.ndarray,
    labels: np.ndarray,
    bins: np.ndarray,
    num_workers: int,
    good_enough: float,
) -> tuple[np.ndarray, np.ndarray]:
    counts = counts.copy()
    best = _peak_key(bin_loads(loads[labels] / counts[labels], bins, num_workers))
    # No worker can be lighter than the mean: once within a hair of it, stop searching.
    floor = max(loads.sum() / num_workers * (1 + _CLOSE_ENOUGH), good_enough)
    for _ in range(_MAX_REFINE_ROUNDS):
        if best[0] <= floor:
            break
        moved = _try_one_move(loads, counts, labels, bins, num_workers, best)
        if moved is None:
            break
        counts, labels, bins, best = moved
    return labels, bins


def _try_one_move(loads, counts, labels, bins, num_workers, best):
    weights = loads[labels] / counts[labels]
    worker_load = bin_loads(weights, bins, num_workers)
    top = int(np.argmax(worker_load))
    on_top = labels[bins == top]
    receivers = on_top[np.argsort(-weights[bins == top], kind="stable")]
    receivers = [r for r in dict.fromkeys(receivers.tolist()) if counts[r] < num_workers]
    spare = np.flatnonzero(counts >= 2)
    # Cheapest donor first: the expert whose per-replica load rises least without one replica.
    donors = spare[np.argsort(loads[spare] / (counts[spare] - 1), kind="stable")]
    for receiver in receivers[:_RECEIVERS_TRIED]:
        for donor in donors[:_DONORS_TRIED]:
            if donor == receiver:
                continue
            trial = _move_replica(loads, counts, labels, bins, num_workers, donor, receiver)
            if trial is None:
                continue
            new_counts, new_labels, new_bins = trial
            key = _peak_key(
                bin_loads(loads[new_labels] / new_counts[new_labels], new_bins, num_workers)
            )
            if key < best:
                return new_counts, new_labels, new_bins, key
    return None


def _move_replica(loads, counts, labels, bins, num_workers, donor, receiver):
    """Relabel one replica of `donor` as `receiver`, on a worker that lacks the receiver
    (the lightest such after the change), then let swaps settle the packing."""
    holds_receiver = set(bins[labels == receiver].tolist())
    candidates = [i for i in np.flatnonzero(labels == donor) if bins[i] not in holds_receiver]
    if not candidates:
        return None
    new_counts = counts.copy()
    new_counts[donor] -= 1
    new_counts[receiver] += 1
    new_labels = labels.copy()
    weights = loads[labels] / new_counts[labels]
    worker_load = bin_loads(weights, bins, num_workers)
    gain = loads[receiver] / new_counts[receiver] - weights[candidates]
    chosen = candidates[int(np.argmin(worker_load[bins[candidates]] + gain))]
    new_labels[chosen] = receiver
    new_bins = bins.copy()
    improve_by_swaps(loads[new_labels] / new_counts[new_labels], new_labels, new_bins, num_workers)
    return new_counts, new_labels, new_bins
