"""Expert-parallel load balancer (EPLB): expert loads in, a PlacementTable out.

Objective: minimise, per MoE layer, the heaviest expert worker's load, where a replicated
expert's load splits evenly over its replicas. Two policies, as in DeepSeek's EPLB:

- hierarchical (needs groups to divide evenly over nodes): expert groups are packed onto nodes
  first, so a token whose experts come from few groups reaches few nodes; then each node
  replicates and places its own experts on its own workers. Its ceiling is how evenly whole
  groups can be split over nodes.
- global: replicate and place over all workers, ignoring groups.

Callers: the `epserve placement` CLI, the benchmark, and the scheduler, which re-plans from a
sliding window of observed loads with `plan(window, config, previous=current_table)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from services.balance.metrics import mean_balancedness, worker_loads
from services.balance.migration import align_to_previous
from services.balance.naive import contiguous_placement, embedded_contiguous_layer
from services.balance.packing import pack_equal_bins
from services.balance.placement import PlacementTable
from services.balance.replica_placer import place_replicas


class Policy(StrEnum):
    AUTO = "auto"  # hierarchical when groups divide evenly over 2+ nodes, else global
    HIERARCHICAL = "hierarchical"
    GLOBAL = "global"


@dataclass(frozen=True)
class EplbConfig:
    # slots
    num_slots: int  # R: physical expert slots per layer (experts + redundant)
    num_workers: int  # M: expert workers ("GPUs"); each holds num_slots // num_workers slots
    # topology
    num_nodes: int = 1  # N: nodes; worker w sits on node w // (num_workers // num_nodes)
    num_groups: int = 1  # G: expert groups (DeepSeek-V3: 8 groups of 32 experts)
    policy: Policy = Policy.AUTO
    # search
    refine: bool = True  # replica-count refinement against the packing (slower, better)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy(self.policy))
        for name in ("num_slots", "num_workers", "num_nodes", "num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_slots % self.num_workers != 0:
            raise ValueError(
                f"num_slots ({self.num_slots}) must be divisible by num_workers "
                f"({self.num_workers})"
            )
        if self.num_workers % self.num_nodes != 0:
            raise ValueError(
                f"num_workers ({self.num_workers}) must be divisible by num_nodes "
                f"({self.num_nodes})"
            )
        if self.policy is Policy.HIERARCHICAL and self.num_groups % self.num_nodes != 0:
            raise ValueError(
                f"hierarchical policy needs num_groups ({self.num_groups}) divisible by "
                f"num_nodes ({self.num_nodes}); use global"
            )

    @property
    def slots_per_worker(self) -> int:
        return self.num_slots // self.num_workers

    @property
    def workers_per_node(self) -> int:
        return self.num_workers // self.num_nodes

    @property
    def resolved_policy(self) -> Policy:
        if self.policy is not Policy.AUTO:
            return self.policy
        # One node: hierarchical and global are the same placement; call it global.
        hierarchical = self.num_nodes > 1 and self.num_groups % self.num_nodes == 0
        return Policy.HIERARCHICAL if hierarchical else Policy.GLOBAL

    def check_experts(self, num_experts: int) -> None:
        if num_experts < 1:
            raise ValueError("loads must name at least one expert per layer")
        if self.num_slots < num_experts:
            raise ValueError(
                f"num_slots ({self.num_slots}) must be >= the number of experts ({num_experts})"
            )
        if num_experts % self.num_groups != 0:
            raise ValueError(
                f"num_groups ({self.num_groups}) must divide the number of experts ({num_experts})"
            )


def validate_loads(loads: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """loads [layers][experts] as a float64 array; ValueError naming what is wrong."""
    try:
        array = np.asarray(loads, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("loads must be a rectangular [layers][experts] array of numbers") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"loads must be a non-empty [layers][experts] array, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("loads must be finite")
    if np.any(array < 0):
        raise ValueError("loads must be >= 0")
    return array


def plan(
    loads: Sequence[Sequence[float]] | np.ndarray,
    config: EplbConfig,
    *,
    layer_ids: Sequence[int] | None = None,
    previous: PlacementTable | None = None,
) -> PlacementTable:
    """A placement for loads [layers][experts].

    With `previous` (the table in service) the result has version previous.version + 1, the
    same layers by default, and workers relabelled so that as many (worker, expert) pairs as
    possible stay where they are: a re-plan moves only the weights it must.
    """
    loads = validate_loads(loads)
    config.check_experts(loads.shape[1])
    if layer_ids is None:
        layer_ids = previous.layer_ids if previous is not None else tuple(range(loads.shape[0]))
    layer_ids = tuple(layer_ids)
    if len(layer_ids) != loads.shape[0]:
        raise ValueError(f"loads has {loads.shape[0]} layers but layer_ids has {len(layer_ids)}")
    if previous is not None:
        _check_compatible(previous, loads.shape[1], config, layer_ids)
    keep_nodes = config.resolved_policy is Policy.HIERARCHICAL
    rows = []
    for index, layer_loads in enumerate(loads):
        row = plan_layer(layer_loads, config)
        if previous is not None:
            old = np.asarray(previous.phy2log[previous.layer_index(layer_ids[index])])
            row = align_to_previous(row, old, config.num_workers, config.num_nodes, keep_nodes)
        rows.append(tuple(int(e) for e in row))
    version = previous.version + 1 if previous is not None else 1
    return PlacementTable(version, config.num_workers, loads.shape[1], layer_ids, tuple(rows))


def _check_compatible(
    previous: PlacementTable, num_experts: int, config: EplbConfig, layer_ids: tuple[int, ...]
) -> None:
    if previous.num_workers != config.num_workers or previous.num_slots != config.num_slots:
        raise ValueError(
            f"previous table has {previous.num_workers} workers x {previous.num_slots} slots, "
            f"config has {config.num_workers} x {config.num_slots}"
        )
    if previous.num_logical_experts != num_experts:
        raise ValueError(
            f"previous table has {previous.num_logical_experts} experts, loads have {num_experts}"
        )
    unknown = sorted(set(layer_ids) - set(previous.layer_ids))
    if unknown:
        raise ValueError(f"layers {unknown} are not in the previous table")


def plan_layer(loads_layer: np.ndarray, config: EplbConfig) -> np.ndarray:
    """phy2log [num_slots] for one layer: the planner's result, or the naive layout when that
    happens to be lighter (so the planner is never worse than naive, by construction)."""
    loads_layer = np.asarray(loads_layer, dtype=np.float64)
    if config.resolved_policy is Policy.HIERARCHICAL:
        planned = _plan_hierarchical(loads_layer, config)
    else:
        planned = place_replicas(
            loads_layer, config.num_slots, config.num_workers, refine=config.refine
        )
    candidates = [planned]
    embedded = embedded_contiguous_layer(loads_layer, config.num_slots, config.num_workers)
    if embedded is not None:
        candidates.append(embedded)  # respects nodes: contiguous experts are whole groups
    if config.resolved_policy is Policy.GLOBAL:
        redundant = config.num_slots - loads_layer.size
        naive = contiguous_placement(
            loads_layer.size, config.num_workers, (0,), redundant, [loads_layer]
        )
        candidates.append(np.asarray(naive.phy2log[0]))
    peaks = [worker_loads(c, loads_layer, config.num_workers).max() for c in candidates]
    return candidates[int(np.argmin(peaks))]  # argmin keeps the first (planned) on ties


def _plan_hierarchical(loads_layer: np.ndarray, config: EplbConfig) -> np.ndarray:
    num_experts = loads_layer.size
    group_size = num_experts // config.num_groups
    group_loads = loads_layer.reshape(config.num_groups, group_size).sum(axis=1)
    node_of_group = pack_equal_bins(group_loads, config.num_nodes)
    node_experts = [
        np.concatenate(
            [
                np.arange(g * group_size, (g + 1) * group_size)
                for g in np.flatnonzero(node_of_group == n)
            ]
        )
        for n in range(config.num_nodes)
    ]
    # No worker can beat the heaviest node's mean; refining other nodes below it is wasted.
    heaviest_node_mean = max(loads_layer[e].sum() for e in node_experts) / config.workers_per_node
    slots_per_node = config.num_slots // config.num_nodes
    rows = [
        experts[
            place_replicas(
                loads_layer[experts],
                slots_per_node,
                config.workers_per_node,
                refine=config.refine,
                good_enough=heaviest_node_mean,
            )
        ]
        for experts in node_experts
    ]
    return np.concatenate(rows)


def should_rebalance(
    current: PlacementTable, window_loads: Sequence[Sequence[float]] | np.ndarray, threshold: float
) -> bool:
    """True when the table in service balances the recent loads worse than `threshold`.

    window_loads [layers][experts] follows current.layer_ids; the measure is the mean over
    layers of mean/max worker load (the benchmark's balancedness), threshold in (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    loads = validate_loads(window_loads)
    if loads.shape != (len(current.layer_ids), current.num_logical_experts):
        raise ValueError(
            f"window_loads must be [{len(current.layer_ids)}][{current.num_logical_experts}], "
            f"got {loads.shape}"
        )
    return placement_balancedness(current, loads) < threshold


def placement_balancedness(table: PlacementTable, loads: np.ndarray) -> float:
    """Mean over layers of mean/max worker load of `table` under loads [layers][experts]."""
    return mean_balancedness(table.phy2log_array(), np.asarray(loads), table.num_workers)
