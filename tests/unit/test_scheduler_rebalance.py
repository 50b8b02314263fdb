"""Live rebalancing, the pure part: the load window, the decision to re-plan, and re-planning."""

from __future__ import annotations

import numpy as np
import pytest

from services.balance.eplb import placement_balancedness
from services.balance.naive import contiguous_placement
from services.balance.placement import PlacementTable
from services.protos_gen.epserve.v1 import control_pb2
from services.scheduler import rebalance
from services.scheduler.rebalance import (
    MIN_GAIN,
    LoadWindow,
    RebalancePolicy,
    ReportRejected,
    decide,
    replan,
)

LAYERS = (1, 2)
EXPERTS = 16
WORKERS = 4
REDUNDANT = 4


def report(tokens: dict[int, list[int]], rank: int = 0, experts: int = EXPERTS
           ) -> control_pb2.ExpertLoadReport:
    """A report for {layer: tokens per logical expert}, layers in the dict's order."""
    layers = list(tokens)
    return control_pb2.ExpertLoadReport(
        rank=rank, placement_version=1, layer_ids=layers, num_logical_experts=experts,
        logical_tokens=[t for layer in layers for t in tokens[layer]])


def one_hot(expert: int, count: int, experts: int = EXPERTS) -> list[int]:
    row = [0] * experts
    row[expert] = count
    return row


def table(version: int = 1) -> PlacementTable:
    return contiguous_placement(EXPERTS, WORKERS, LAYERS, redundant=REDUNDANT, version=version)


def skewed_loads() -> np.ndarray:
    """Expert e gets 10 * (e + 1) tokens: the contiguous layout puts the heavy ones together."""
    return np.tile(np.arange(1, EXPERTS + 1, dtype=np.float64) * 10, (len(LAYERS), 1))


def uniform_loads(per_expert: float = 100.0) -> np.ndarray:
    return np.full((len(LAYERS), EXPERTS), per_expert)


# ---- LoadWindow ---------------------------------------------------------------------------------


def test_window_rejects_a_non_positive_length():
    with pytest.raises(ValueError, match="window_s"):
        LoadWindow(0, LAYERS, EXPERTS)


def test_add_rejects_a_report_for_another_expert_count():
    window = LoadWindow(10, LAYERS, EXPERTS)
    with pytest.raises(ReportRejected, match="8 experts"):
        window.add(report({1: [1] * 8}, experts=8), now=0.0)
    assert window.loads(0.0).sum() == 0


def test_add_rejects_logical_tokens_of_the_wrong_length():
    window = LoadWindow(10, LAYERS, EXPERTS)
    bad = report({1: [1] * EXPERTS, 2: [1] * EXPERTS})
    bad.logical_tokens.append(5)  # 33 entries for 2 layers x 16 experts
    with pytest.raises(ReportRejected, match="33 entries"):
        window.add(bad, now=0.0)
    assert window.loads(0.0).sum() == 0


def test_add_rejects_an_unknown_layer_and_keeps_nothing_of_the_report():
    window = LoadWindow(10, LAYERS, EXPERTS)
    # The first row is for a valid layer: it must not be counted either.
    with pytest.raises(ReportRejected, match="layer 0"):
        window.add(report({1: one_hot(3, 7), 0: one_hot(3, 7)}), now=0.0)
    assert window.loads(0.0).sum() == 0


def test_loads_sum_the_reports_per_layer_whatever_their_layer_order():
    window = LoadWindow(10, LAYERS, EXPERTS)
    window.add(report({2: one_hot(5, 4), 1: one_hot(0, 3)}, rank=0), now=0.0)
    window.add(report({1: one_hot(0, 2)}, rank=1), now=1.0)  # a subset of the layers
    window.add(report({1: one_hot(15, 1), 2: one_hot(5, 6)}, rank=2), now=2.0)
    loads = window.loads(2.0)
    assert loads.shape == (len(LAYERS), EXPERTS)
    expected = np.zeros((2, EXPERTS))
    expected[0, 0], expected[0, 15], expected[1, 5] = 5, 1, 10  # row 0 is layer 1, row 1 layer 2
    np.testing.assert_array_equal(loads, expected)


def test_reports_older_than_the_window_expire():
    window = LoadWindow(10, LAYERS, EXPERTS)
    window.add(report({1: one_hot(0, 1)}), now=100.0)
    window.add(report({1: one_hot(1, 2)}), now=105.0)
    assert window.loads(110.0)[0, :2].tolist() == [1, 2]  # exactly window_s old: still in
    assert window.loads(110.5)[0, :2].tolist() == [0, 2]  # the first one is gone
    assert window.loads(115.5).sum() == 0
    # Adding at a later time expires what the new time leaves behind, too.
    window.add(report({1: one_hot(2, 3)}), now=200.0)
    assert window.loads(200.0)[0].tolist() == one_hot(2, 3)


def test_clear_forgets_every_report():
    window = LoadWindow(10, LAYERS, EXPERTS)
    window.add(report({1: one_hot(0, 9), 2: one_hot(1, 9)}), now=0.0)
    window.clear()
    assert window.loads(0.0).sum() == 0
    window.add(report({2: one_hot(4, 2)}), now=1.0)
    assert window.loads(1.0).sum() == 2


# ---- decide -------------------------------------------------------------------------------------


def test_a_disabled_policy_never_replans():
    policy = RebalancePolicy(threshold=0.0, period_s=0.0, min_tokens=0, cooldown_s=0)
    assert not policy.enabled
    assert decide(table(), skewed_loads(), now=1e6, last_plan_at=0.0, policy=policy) is None


def test_threshold_gives_the_imbalance_reason():
    loads = skewed_loads()
    balance = placement_balancedness(table(), loads)
    assert balance < 0.8
    policy = RebalancePolicy(threshold=0.8, min_tokens=1, cooldown_s=0)
    why = decide(table(), loads, now=10.0, last_plan_at=0.0, policy=policy)
    assert why == f"imbalance: balancedness {balance:.3f} < 0.800"
    # Balanced enough for a looser threshold: no reason (and no period configured).
    loose = RebalancePolicy(threshold=balance - 0.01, min_tokens=1, cooldown_s=0)
    assert decide(table(), loads, now=10.0, last_plan_at=0.0, policy=loose) is None


def test_cooldown_holds_back_a_new_plan():
    policy = RebalancePolicy(threshold=0.99, min_tokens=1, cooldown_s=60)
    loads = skewed_loads()
    assert decide(table(), loads, now=159.0, last_plan_at=100.0, policy=policy) is None
    assert decide(table(), loads, now=160.0, last_plan_at=100.0, policy=policy) is not None


def test_min_tokens_is_per_layer_on_average():
    policy = RebalancePolicy(threshold=0.99, min_tokens=100, cooldown_s=0)
    loads = np.zeros((len(LAYERS), EXPERTS))
    loads[0, 0] = 199  # 99.5 per layer: too little traffic to judge
    assert decide(table(), loads, now=10.0, last_plan_at=0.0, policy=policy) is None
    loads[0, 0] = 200  # 100 per layer
    assert decide(table(), loads, now=10.0, last_plan_at=0.0, policy=policy).startswith(
        "imbalance")


def test_period_replans_a_balanced_placement_once_it_has_passed():
    policy = RebalancePolicy(threshold=0.5, period_s=100, min_tokens=1, cooldown_s=0)
    loads = np.full((len(LAYERS), EXPERTS), 100.0)
    loads[:, :4] = 200  # the 4 redundant copies of 0..3 make this perfectly balanced
    assert placement_balancedness(table(), loads) == pytest.approx(1.0)
    assert decide(table(), loads, now=50.0, last_plan_at=0.0, policy=policy) is None
    assert decide(table(), loads, now=150.0, last_plan_at=0.0, policy=policy) == (
        "period: 150s since the last plan")


def test_imbalance_takes_precedence_over_the_period():
    policy = RebalancePolicy(threshold=0.9, period_s=1, min_tokens=1, cooldown_s=0)
    why = decide(table(), skewed_loads(), now=500.0, last_plan_at=0.0, policy=policy)
    assert why.startswith("imbalance")


# ---- replan -------------------------------------------------------------------------------------


def check_valid_next(current: PlacementTable, new: PlacementTable) -> None:
    assert new.version == current.version + 1
    assert new.layer_ids == current.layer_ids
    assert new.num_workers == current.num_workers
    assert new.num_logical_experts == current.num_logical_experts
    assert new.num_slots == current.num_slots
    for row in new.phy2log:
        assert set(row) == set(range(EXPERTS))  # every expert keeps at least one replica
        assert len(row) == EXPERTS + REDUNDANT
    per_worker = [len(new.slots_of_worker(w)) for w in range(new.num_workers)]
    assert per_worker == [new.num_slots // new.num_workers] * new.num_workers


def test_replan_balances_skewed_loads_better_under_a_new_version():
    current, loads = table(version=3), skewed_loads()
    new = replan(current, loads, RebalancePolicy(threshold=0.9))
    assert new is not None
    check_valid_next(current, new)
    before, after = placement_balancedness(current, loads), placement_balancedness(new, loads)
    assert after >= before + MIN_GAIN
    assert after > 0.95


def test_replan_with_layers_skewed_differently_gives_each_layer_its_own_row():
    current = table()
    loads = skewed_loads()
    loads[1] = loads[1][::-1]  # layer 2's heavy experts are layer 1's light ones
    new = replan(current, loads, RebalancePolicy(threshold=0.9))
    assert new is not None
    check_valid_next(current, new)
    assert new.phy2log[0] != new.phy2log[1]
    assert placement_balancedness(new, loads) > placement_balancedness(current, loads) + MIN_GAIN


def test_replan_of_its_own_result_is_none():
    loads = skewed_loads()
    new = replan(table(), loads, RebalancePolicy(threshold=0.9))
    assert replan(new, loads, RebalancePolicy(threshold=0.9)) is None


def test_replan_without_gain_is_none():
    # The contiguous table already balances uniform loads perfectly: any other layout the
    # planner finds gains nothing and must not be rolled out (a roll-out moves weights).
    current = contiguous_placement(EXPERTS, WORKERS, LAYERS, redundant=0, version=1)
    loads = uniform_loads()
    assert placement_balancedness(current, loads) == pytest.approx(1.0)
    assert replan(current, loads, RebalancePolicy(period_s=10)) is None


def permuted_within_workers(current: PlacementTable) -> PlacementTable:
    """The same experts on every worker, in another slot order: another table, the same load."""
    spw = current.slots_per_worker
    rows = tuple(tuple(e for w in range(current.num_workers)
                       for e in reversed(row[w * spw:(w + 1) * spw])) for row in current.phy2log)
    return PlacementTable(current.version + 1, current.num_workers, current.num_logical_experts,
                          current.layer_ids, rows)


def test_replan_is_none_when_the_gain_is_below_min_gain(monkeypatch):
    current, loads = table(), skewed_loads()
    same_load = permuted_within_workers(current)
    assert same_load.phy2log != current.phy2log
    monkeypatch.setattr(rebalance, "plan", lambda *a, **k: same_load)
    assert replan(current, loads, RebalancePolicy(threshold=0.9)) is None


def test_replan_is_none_when_the_plan_equals_the_current_table(monkeypatch):
    current = table()
    monkeypatch.setattr(rebalance, "plan", lambda *a, **k: current.with_version(2))
    assert replan(current, skewed_loads(), RebalancePolicy(threshold=0.9)) is None


def test_replan_passes_the_policy_topology_to_the_planner(monkeypatch):
    seen = {}

    def fake_plan(loads, config, *, previous=None):
        seen.update(config=config, previous=previous)
        return previous

    monkeypatch.setattr(rebalance, "plan", fake_plan)
    current = contiguous_placement(EXPERTS, WORKERS, LAYERS, redundant=REDUNDANT)
    replan(current, skewed_loads(),
           RebalancePolicy(threshold=0.9, num_nodes=2, num_groups=4, policy="hierarchical"))
    config = seen["config"]
    assert (config.num_slots, config.num_workers) == (EXPERTS + REDUNDANT, WORKERS)
    assert (config.num_nodes, config.num_groups, config.policy) == (2, 4, "hierarchical")
    assert seen["previous"] is current
