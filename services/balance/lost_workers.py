"""A placement that no longer needs some workers (pure): cover the experts they alone held.

When expert workers are lost for good (no restart brought them back), every expert only they
held is given a slot on a live worker, taking the place of a redundant copy there (a slot
whose expert has another replica on a live worker); the heaviest missing experts first, each
onto the live worker carrying the least load. Nothing else moves, so a roll-out loads only
the replacements. The lost workers keep their slots: if one comes back it serves its old
experts, which are now also elsewhere.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from services.balance.placement import PlacementTable


def covers_without(table: PlacementTable, lost: frozenset[int]) -> bool:
    """Every expert of every layer has a replica on a worker not in `lost`."""
    per = table.slots_per_worker
    for row in table.phy2log:
        live = {e for slot, e in enumerate(row) if slot // per not in lost}
        if len(live) < table.num_logical_experts:
            return False
    return True


def placement_without(table: PlacementTable, lost: frozenset[int],
                      loads: np.ndarray | None = None) -> PlacementTable | None:
    """The next version, covering every expert on live workers; None when the live workers
    have too few redundant slots to take the lost workers' experts (more would have to be
    dropped than can be)."""
    per, experts = table.slots_per_worker, table.num_logical_experts
    if loads is None or not np.asarray(loads).any():
        loads = np.ones((len(table.layer_ids), experts))
    rows = []
    for index, row in enumerate(table.phy2log):
        new = _cover_layer(list(row), lost, per, np.asarray(loads[index], dtype=np.float64))
        if new is None:
            return None
        rows.append(tuple(new))
    return PlacementTable(table.version + 1, table.num_workers, experts, table.layer_ids,
                          tuple(rows))


def _cover_layer(row: list[int], lost: frozenset[int], per: int,
                 loads: np.ndarray) -> list[int] | None:
    live_slots = [s for s in range(len(row)) if s // per not in lost]
    copies = Counter(row[s] for s in live_slots)
    missing = sorted((e for e in range(len(loads)) if not copies[e]), key=lambda e: -loads[e])
    worker_load: Counter[int] = Counter()
    for s in live_slots:  # each replica takes an equal share of its expert's load
        worker_load[s // per] += loads[row[s]] / copies[row[s]]
    for expert in missing:
        spare = [s for s in live_slots if copies[row[s]] > 1]
        if not spare:
            return None
        slot = min(spare, key=lambda s: (worker_load[s // per], s))
        old = row[slot]
        worker_load[slot // per] += loads[expert] - loads[old] / copies[old]
        copies[old] -= 1
        row[slot], copies[expert] = expert, 1
    return row
