"""Choosing the instance whose worst normalised load stays lowest.

Each balancer has a few load dimensions (prefill: attention cost and tokens; decode: KV usage
and requests). For a candidate instance i we add the request to i only and divide each of i's
new loads by that dimension's fair share (the cluster total after the request, split evenly,
or by capacity). The request goes to the instance with the smallest worst ratio: the instance
that would stay furthest below its fair share in its most loaded dimension. Since only the
chosen instance changes, this is the greedy step that keeps the cluster's worst ratio lowest.
Ties: smaller sum of ratios, then the smaller instance id (deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.balance.ledger import NoEligibleInstance
from services.common.states import InstanceState


def pick_lowest(
    ids: Sequence[str], ratios: Sequence[Sequence[float]], weights: Sequence[float]
) -> str:
    """ids[i] with the smallest (max_k w_k r_ik, sum_k w_k r_ik, id)."""
    best_key = None
    best_id = None
    for instance_id, row in zip(ids, ratios, strict=True):
        weighted = [w * r for w, r in zip(weights, row, strict=True)]
        key = (max(weighted), sum(weighted), instance_id)
        if best_key is None or key < best_key:
            best_key, best_id = key, instance_id
    if best_id is None:
        raise NoEligibleInstance("no instance to choose from")
    return best_id


def active_only(instances: Sequence) -> list:
    """The instances that take new requests; duplicate ids are a caller bug."""
    ids = [i.instance_id for i in instances]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate instance ids in {sorted(ids)}")
    active = [i for i in instances if i.state is InstanceState.SERVING]
    if not active:
        raise NoEligibleInstance(f"none of {len(instances)} instances is serving")
    return active


def check_weights(**weights: float) -> None:
    for name, value in weights.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not any(weights.values()):
        raise ValueError(f"at least one of {sorted(weights)} must be positive")
