"""Live rebalancing's pure part on real loads: the trained demo model's per-expert token counts
over its two held-out plays (checkpoints/bard-moe/expert_loads.json), not synthetic ones.

The demo's layout (4 expert workers, 4 redundant slots, contiguous) is judged, re-planned on one
play's loads, and the new plan is checked on the other play's: loads drift between workloads,
and a plan must keep most of its gain on the next one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.balance.eplb import placement_balancedness
from services.balance.naive import contiguous_placement
from services.scheduler.rebalance import RebalancePolicy, decide, replan
from services.train.expert_loads import ExpertLoads

BARD = Path(__file__).resolve().parents[2] / "checkpoints" / "bard-moe"
WORKERS, REDUNDANT = 4, 4


@pytest.fixture(scope="module")
def real():
    loads = ExpertLoads.from_dir(BARD)
    (_, first), (_, second) = sorted(loads.parts.items())
    experts = len(next(iter(loads.layers.values())))
    table = contiguous_placement(experts, WORKERS, sorted(loads.layers), redundant=REDUNDANT)
    return loads, table, np.asarray(first.matrix(), float), np.asarray(second.matrix(), float)


def test_the_loads_are_real_routing_counts(real):
    loads, _, first, second = real
    k = 6  # bard-moe's num_experts_per_tok
    for matrix, part in ((first, loads.parts[sorted(loads.parts)[0]]),
                         (second, loads.parts[sorted(loads.parts)[1]])):
        assert (matrix.sum(axis=1) == part.tokens * k).all()
    # Trained routing is skewed (less than at random init: the bias balances it over a whole
    # play), yet in every layer some expert takes well over its even share.
    assert (first.max(axis=1) / first.mean(axis=1) > 1.15).all()


def test_real_skew_triggers_a_rebalance_that_survives_the_next_workload(real):
    _, table, plan_on, next_load = real
    before = placement_balancedness(table, plan_on)
    policy = RebalancePolicy(threshold=0.99, min_tokens=1, cooldown_s=0)
    assert decide(table, plan_on, now=10.0, last_plan_at=0.0, policy=policy).startswith(
        "imbalance")
    new = replan(table, plan_on, policy)
    assert new is not None and new.version == table.version + 1
    after = placement_balancedness(new, plan_on)
    assert after > before
    # On the other play: still better than the layout it replaced.
    assert placement_balancedness(new, next_load) > placement_balancedness(table, next_load)
