"""Keeping a re-plan close to the placement in service.

Which physical worker gets which planned bin is arbitrary for the load objective (and, under
the hierarchical policy, so is which physical node gets which planned node). Choosing that
relabelling to keep as many (worker, expert) pairs in place as possible means a re-plan ships
only the expert weights it must.
"""

from __future__ import annotations

import numpy as np

from services.balance.placement import PlacementTable


def _incidence(row: np.ndarray, num_blocks: int, num_experts: int) -> np.ndarray:
    """[blocks, experts] 0/1: does block b hold expert e (blocks are equal runs of slots)."""
    holds = np.zeros((num_blocks, num_experts), dtype=np.int64)
    block_of_slot = np.arange(row.size) // (row.size // num_blocks)
    holds[block_of_slot, row] = 1
    return holds


def _greedy_matching(overlap: np.ndarray) -> np.ndarray:
    """new block -> old block, taking the largest overlaps first (ties: lower indices)."""
    size = overlap.shape[0]
    new_idx, old_idx = np.unravel_index(
        np.lexsort((np.arange(overlap.size), -overlap.reshape(-1))), overlap.shape
    )
    target = np.full(size, -1, dtype=np.int64)
    taken = np.zeros(size, dtype=bool)
    for n, o in zip(new_idx.tolist(), old_idx.tolist(), strict=True):
        if target[n] < 0 and not taken[o]:
            target[n] = o
            taken[o] = True
    return target


def align_to_previous(
    new_row: np.ndarray, old_row: np.ndarray, num_workers: int, num_nodes: int, keep_nodes: bool
) -> np.ndarray:
    """new_row with its worker blocks permuted to overlap old_row as much as possible.

    keep_nodes: permute whole nodes, then workers within a node (a hierarchical plan must keep
    each node's workers together); otherwise any worker may take any block.
    """
    new_row = np.asarray(new_row, dtype=np.int64)
    old_row = np.asarray(old_row, dtype=np.int64)
    if new_row.shape != old_row.shape:
        raise ValueError(f"rows differ in shape: {new_row.shape} vs {old_row.shape}")
    num_experts = int(max(new_row.max(), old_row.max())) + 1
    spw = new_row.size // num_workers
    new_blocks = new_row.reshape(num_workers, spw)
    new_holds = _incidence(new_row, num_workers, num_experts)
    old_holds = _incidence(old_row, num_workers, num_experts)
    worker_overlap = new_holds @ old_holds.T  # [new worker, old worker]
    if not keep_nodes or num_nodes == 1:
        target = _greedy_matching(worker_overlap)
    else:
        per_node = num_workers // num_nodes
        node_overlap = worker_overlap.reshape(num_nodes, per_node, num_nodes, per_node).sum((1, 3))
        node_target = _greedy_matching(node_overlap)
        target = np.empty(num_workers, dtype=np.int64)
        for new_node, old_node in enumerate(node_target.tolist()):
            new_ws = np.arange(new_node * per_node, (new_node + 1) * per_node)
            old_ws = np.arange(old_node * per_node, (old_node + 1) * per_node)
            inner = _greedy_matching(worker_overlap[np.ix_(new_ws, old_ws)])
            target[new_ws] = old_ws[inner]
    aligned = np.empty_like(new_blocks)
    aligned[target] = new_blocks
    return aligned.reshape(-1)


def experts_to_load(old: PlacementTable, new: PlacementTable) -> int:
    """How many (layer, worker, expert) weight sets `new` puts where `old` had none."""
    if (old.num_workers, old.num_slots) != (new.num_workers, new.num_slots):
        raise ValueError("tables differ in workers or slots")
    total = 0
    for layer_id in new.layer_ids:
        for worker in range(new.num_workers):
            before = set(old.logical_experts_on_worker(layer_id, worker))
            after = new.logical_experts_on_worker(layer_id, worker)
            total += sum(1 for e in after if e not in before)
    return total
