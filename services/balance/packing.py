"""Packing weighted items into bins that each take exactly the same number of items.

Used twice by the planner: expert groups onto nodes, and expert replicas onto workers. The
objective is the heaviest bin. Longest-processing-time first (heaviest item onto the lightest
bin that still has room) gives a good start; pairwise swaps between the heaviest bin and any
other then remove most of what LPT leaves (LPT cannot undo an early choice, swaps can).
Items carry a label (the logical expert); two items with one label are kept on different bins
when possible, since two replicas of one expert on one worker split nothing.
"""

from __future__ import annotations

import numpy as np

_MAX_SWAP_ROUNDS = 10_000


def pack_equal_bins(
    weights: np.ndarray,
    num_bins: int,
    labels: np.ndarray | None = None,
    max_swap_rounds: int = _MAX_SWAP_ROUNDS,
) -> np.ndarray:
    """Bin index of each item; every bin gets len(weights) // num_bins items."""
    weights = np.asarray(weights, dtype=np.float64)
    if num_bins < 1 or weights.size % num_bins != 0:
        raise ValueError(f"{weights.size} items do not split evenly into {num_bins} bins")
    labels = np.arange(weights.size) if labels is None else np.asarray(labels)
    bins = _lpt(weights, labels, num_bins, weights.size // num_bins)
    improve_by_swaps(weights, labels, bins, num_bins, max_swap_rounds)
    return bins


def _lpt(weights: np.ndarray, labels: np.ndarray, num_bins: int, capacity: int) -> np.ndarray:
    bins = np.empty(weights.size, dtype=np.int64)
    load = np.zeros(num_bins)
    count = np.zeros(num_bins, dtype=np.int64)
    present = np.zeros((num_bins, int(labels.max()) + 1), dtype=bool)
    bin_index = np.arange(num_bins)
    for item in np.lexsort((labels, -weights)):  # heaviest first, ties by label
        label = labels[item]
        # Choose by (full?, already holds the label?, load, item count, index), smallest first:
        # a full bin is never chosen, a duplicate label only when no other bin has room.
        blocked = (count >= capacity) * 2 + present[:, label]
        open_bins = bin_index[blocked == blocked.min()]
        lightest = open_bins[load[open_bins] == load[open_bins].min()]
        target = int(lightest[np.argmin(count[lightest])])
        bins[item] = target
        load[target] += weights[item]
        count[target] += 1
        present[target, label] = True
    return bins


def bin_loads(weights: np.ndarray, bins: np.ndarray, num_bins: int) -> np.ndarray:
    return np.bincount(bins, weights=weights, minlength=num_bins)


def improve_by_swaps(
    weights: np.ndarray,
    labels: np.ndarray,
    bins: np.ndarray,
    num_bins: int,
    max_rounds: int = _MAX_SWAP_ROUNDS,
) -> None:
    """In place: swap an item of the heaviest bin with a lighter item elsewhere while that
    lowers the heaviest bin without making the other bin as heavy. Best swap first; each swap
    strictly lowers the sorted load vector, so this terminates."""
    load = bin_loads(weights, bins, num_bins)
    tolerance = 1e-12 * max(float(weights.sum()), 1.0)
    for _ in range(max_rounds):
        top = int(np.argmax(load))
        mine = np.flatnonzero(bins == top)
        others = np.flatnonzero(bins != top)
        if others.size == 0:
            return
        delta = weights[mine][:, None] - weights[others][None, :]  # [mine, others]
        other_load = load[bins[others]][None, :]
        new_peak = np.maximum(load[top] - delta, other_load + delta)
        ok = (delta > 0) & (new_peak < load[top] - tolerance)
        ok &= _label_safe(labels, bins, mine, others)
        if not ok.any():
            return
        new_peak = np.where(ok, new_peak, np.inf)
        i, j = np.unravel_index(int(np.argmin(new_peak)), new_peak.shape)
        a, b = mine[i], others[j]
        load[top] -= delta[i, j]
        load[bins[b]] += delta[i, j]
        bins[a], bins[b] = bins[b], top


def _label_safe(labels: np.ndarray, bins: np.ndarray, mine: np.ndarray, others: np.ndarray):
    """[mine, others] mask: the swap puts no label twice into a bin that did not already
    have it twice (swapping equal labels is pointless and excluded by delta > 0 anyway)."""
    num_bins = int(bins.max()) + 1
    num_labels = int(labels.max()) + 1
    present = np.zeros((num_bins, num_labels), dtype=np.int64)
    np.add.at(present, (bins, labels), 1)
    top = bins[mine[0]]
    # Moving other item j into the top bin: its label must be absent there (besides item i).
    into_top = present[top, labels[others]][None, :] - (
        labels[mine][:, None] == labels[others][None, :]
    )
    # Moving mine item i into j's bin: its label must be absent there (besides item j).
    into_other = present[bins[others][None, :], labels[mine][:, None]] - (
        labels[mine][:, None] == labels[others][None, :]
    )
    return (into_top == 0) & (into_other == 0)
