"""The expert placement table: which logical expert each physical slot of each MoE layer holds.

Physical slot `p` of every layer lives on expert worker (EP rank) `p // slots_per_worker`; the
table is the contract between the EPLB planner, the scheduler that publishes it, the expert
workers that load the slots' weights and the attention instances that route tokens to slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

_DICT_KEYS = ("version", "num_workers", "num_logical_experts", "layer_ids", "phy2log")


class NoLiveReplica(ValueError):
    """Every replica of an expert the batch needs is on a worker that is down."""

    def __init__(self, layer_id: int, experts: list[int]) -> None:
        super().__init__(f"layer {layer_id}: experts {experts[:8]} have no replica on a live "
                         f"expert worker")
        self.layer_id, self.experts = layer_id, experts


def _check_int(name: str, value: Any) -> int:
    # bool is an int subclass, and a JSON float like 3.0 is a sign of a broken producer.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PlacementTable:
    version: int  # >= 1, monotonically increasing across re-plans
    num_workers: int  # expert workers ("GPUs"), EP ranks 0..num_workers-1
    num_logical_experts: int  # routed experts per MoE layer (e.g. 256)
    layer_ids: tuple[int, ...]  # model layer index of each MoE layer (e.g. (3, 4, ..., 60))
    phy2log: tuple[tuple[int, ...], ...]  # [len(layer_ids)][num_slots]: logical expert per slot

    def __post_init__(self) -> None:
        version = _check_int("version", self.version)
        workers = _check_int("num_workers", self.num_workers)
        experts = _check_int("num_logical_experts", self.num_logical_experts)
        # Normalise lists and numpy integers into tuples of int: hashable and JSON-safe.
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "num_workers", workers)
        object.__setattr__(self, "num_logical_experts", experts)
        object.__setattr__(
            self, "layer_ids", tuple(_check_int("layer id", x) for x in self.layer_ids)
        )
        try:
            rows = tuple(tuple(_check_int("phy2log entry", x) for x in r) for r in self.phy2log)
        except TypeError:
            raise ValueError("phy2log must be a sequence of per-layer sequences") from None
        object.__setattr__(self, "phy2log", rows)
        if version < 1:
            raise ValueError(f"version must be >= 1, got {version}")
        if workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {workers}")
        if experts < 1:
            raise ValueError(f"num_logical_experts must be >= 1, got {experts}")
        self._validate_layers()
        self._validate_slots(workers, experts)

    def _validate_layers(self) -> None:
        if not self.layer_ids:
            raise ValueError("layer_ids must name at least one MoE layer")
        for layer_id in self.layer_ids:
            if layer_id < 0:
                raise ValueError(f"layer ids must be >= 0, got {layer_id}")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must be unique, got {self.layer_ids}")
        if len(self.phy2log) != len(self.layer_ids):
            raise ValueError(
                f"phy2log has {len(self.phy2log)} layers but layer_ids has {len(self.layer_ids)}"
            )

    def _validate_slots(self, workers: int, experts: int) -> None:
        num_slots = len(self.phy2log[0])
        if num_slots % workers != 0:
            raise ValueError(
                f"num_slots ({num_slots}) must be divisible by num_workers ({workers})"
            )
        if num_slots < experts:
            raise ValueError(f"num_slots ({num_slots}) is fewer than the {experts} experts")
        for layer_id, row in zip(self.layer_ids, self.phy2log, strict=True):
            if len(row) != num_slots:
                raise ValueError(
                    f"layer {layer_id} has {len(row)} slots, layer {self.layer_ids[0]} "
                    f"has {num_slots}: every layer needs the same slot count"
                )
            for slot, expert in enumerate(row):
                if not 0 <= expert < experts:
                    raise ValueError(
                        f"layer {layer_id} slot {slot} holds expert {expert}, "
                        f"outside 0..{experts - 1}"
                    )
            missing = sorted(set(range(experts)) - set(row))
            if missing:
                raise ValueError(
                    f"layer {layer_id} has no replica of experts {missing[:8]}"
                    + (" ..." if len(missing) > 8 else "")
                )

    # ---- geometry -------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return len(self.phy2log[0])

    @property
    def slots_per_worker(self) -> int:
        return self.num_slots // self.num_workers

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_logical_experts

    def worker_of_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside 0..{self.num_slots - 1}")
        return slot // self.slots_per_worker

    def slots_of_worker(self, worker: int) -> range:
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker {worker} outside 0..{self.num_workers - 1}")
        start = worker * self.slots_per_worker
        return range(start, start + self.slots_per_worker)

    def layer_index(self, layer_id: int) -> int:
        try:
            return self._layer_index[layer_id]
        except KeyError:
            raise ValueError(
                f"layer {layer_id} is not a MoE layer of this table (layers {self.layer_ids})"
            ) from None

    # ---- lookups ----------------------------------------------------------------------------

    def logical_experts_on_worker(self, layer_id: int, worker: int) -> tuple[int, ...]:
        row = self.phy2log[self.layer_index(layer_id)]
        slots = self.slots_of_worker(worker)
        return tuple(sorted(set(row[slots.start : slots.stop])))

    def replicas(self, layer_id: int) -> list[list[int]]:
        """Per logical expert: its physical slots, ascending."""
        result: list[list[int]] = [[] for _ in range(self.num_logical_experts)]
        for slot, expert in enumerate(self.phy2log[self.layer_index(layer_id)]):
            result[expert].append(slot)
        return result

    def replica_counts(self, layer_id: int) -> tuple[int, ...]:
        return tuple(len(slots) for slots in self.replicas(layer_id))

    def route(self, layer_id: int, topk_ids: np.ndarray, offset: int = 0,
              down: frozenset[int] = frozenset()) -> np.ndarray:
        """Map logical expert ids [T, K] to physical slots [T, K], spreading over replicas.

        Within the batch, the i-th occurrence (row-major order) of an expert with n replicas
        goes to its replica (offset + i) % n, so each replica receives floor or ceil of the
        expert's count/n. `offset` rotates the start; an attention instance passes its DP rank
        so that instances sending one token each do not all pile onto the first replica.
        Entries of -1 (padding, no expert) stay -1. Pure: same inputs, same slots.
        `down`: workers to route around (their slots are skipped); NoLiveReplica when an
        expert the batch needs has no slot left.
        """
        ids = np.asarray(topk_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"topk_ids must be an integer array, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"topk_ids must be 2-D [tokens, k], got shape {ids.shape}")
        flat = ids.reshape(-1).astype(np.int64)
        valid = flat >= 0
        if np.any(flat >= self.num_logical_experts) or np.any(flat < -1):
            bad = flat[(flat >= self.num_logical_experts) | (flat < -1)][0]
            raise ValueError(
                f"topk_ids holds expert {bad}, outside 0..{self.num_logical_experts - 1}"
            )
        arrays = self._surviving_route_arrays(down) if down else self._route_arrays
        slot_table, counts = arrays[self.layer_index(layer_id)]
        experts = flat[valid]
        if down and not counts[experts].all():
            raise NoLiveReplica(layer_id, sorted({int(e) for e in experts[counts[experts] == 0]}))
        # Rank of each entry among the entries of the same expert, in row-major order.
        order = np.argsort(experts, kind="stable")
        sorted_experts = experts[order]
        group_start = np.searchsorted(sorted_experts, sorted_experts, side="left")
        rank = np.empty_like(experts)
        rank[order] = np.arange(experts.size) - group_start
        replica = (rank + offset) % counts[experts]
        out = np.full(flat.shape, -1, dtype=np.int64)
        out[valid] = slot_table[experts, replica]
        return out.reshape(ids.shape)

    # ---- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "num_workers": self.num_workers,
            "num_logical_experts": self.num_logical_experts,
            "layer_ids": list(self.layer_ids),
            "phy2log": [list(row) for row in self.phy2log],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PlacementTable:
        if not isinstance(d, dict):
            raise ValueError(f"placement table must be a JSON object, got {type(d).__name__}")
        missing = [key for key in _DICT_KEYS if key not in d]
        if missing:
            raise ValueError(f"placement table lacks keys {missing}")
        extra = sorted(set(d) - set(_DICT_KEYS))
        if extra:
            raise ValueError(f"placement table has unknown keys {extra}")
        if not isinstance(d["layer_ids"], list | tuple):
            raise ValueError("layer_ids must be a list")
        rows = d["phy2log"]
        if not isinstance(rows, list | tuple) or not all(isinstance(r, list | tuple) for r in rows):
            raise ValueError("phy2log must be a list of lists")
        return cls(
            version=d["version"],
            num_workers=d["num_workers"],
            num_logical_experts=d["num_logical_experts"],
            layer_ids=tuple(d["layer_ids"]),
            phy2log=tuple(tuple(row) for row in rows),
        )

    def with_version(self, version: int) -> PlacementTable:
        return PlacementTable(
            version, self.num_workers, self.num_logical_experts, self.layer_ids, self.phy2log
        )

    def phy2log_array(self) -> np.ndarray:
        """phy2log as an int64 array [layers, slots]."""
        return np.asarray(self.phy2log, dtype=np.int64)

    # ---- caches (derived from the frozen fields, never part of equality) --------------------

    @cached_property
    def _layer_index(self) -> dict[int, int]:
        return {layer_id: index for index, layer_id in enumerate(self.layer_ids)}

    @cached_property
    def _route_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._arrays_for(frozenset())

    @cached_property
    def _route_arrays_by_down(self) -> dict[frozenset[int], list]:
        return {}

    def _surviving_route_arrays(self, down: frozenset[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        cache = self._route_arrays_by_down
        if down not in cache:
            cache[down] = self._arrays_for(down)
        return cache[down]

    def _arrays_for(self, down: frozenset[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        # Per layer: slot_table [experts, max_replicas] (padded by repeating) and counts
        # [experts] of the slots not on a `down` worker (0: no live replica; its row is unused).
        arrays = []
        per = self.slots_per_worker
        for layer_id in self.layer_ids:
            replicas = [[s for s in r if s // per not in down] for r in self.replicas(layer_id)]
            counts = np.array([len(r) for r in replicas], dtype=np.int64)
            table = np.zeros((self.num_logical_experts, max(1, int(counts.max()))), dtype=np.int64)
            for expert, slots in enumerate(replicas):
                if slots:
                    table[expert] = np.resize(np.asarray(slots, dtype=np.int64), table.shape[1])
            arrays.append((table, counts))
        return arrays
