"""The scheduler's initial placement and overlap plan, and the checks on stored state."""

from __future__ import annotations

import pytest

from services.balance.placement_proto import table_from, topology_from
from services.model.config import ModelConfig
from services.model.presets import PRESETS
from services.protos_gen.epserve.v1 import control_pb2 as pb
from services.scheduler.config import SchedulerConfig
from services.scheduler.initial_state import (
    FIRST_VERSION,
    check_plan,
    check_topology_fits,
    initial_placement,
    initial_plan,
)


def model_cfg(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**PRESETS["tiny"], **overrides})


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return model_cfg()


def sched(**kw) -> SchedulerConfig:
    kw.setdefault("model", "/models/tiny")
    kw.setdefault("expert_workers", 4)
    return SchedulerConfig(**kw)


def test_tiny_preset_shape(tiny):
    # The numbers below depend on these: 16 experts, MoE on layers 1 and 2.
    assert tiny.n_routed_experts == 16 and tiny.moe_layer_ids == (1, 2)


def test_initial_placement_is_contiguous_version_one(tiny):
    table = initial_placement(sched(expert_workers=4), tiny)
    assert table.version == FIRST_VERSION == 1
    assert table.num_workers == 4 and table.num_logical_experts == 16
    assert table.layer_ids == (1, 2)
    assert table.phy2log == (tuple(range(16)), tuple(range(16)))
    assert table.logical_experts_on_worker(1, 0) == (0, 1, 2, 3)
    assert table.logical_experts_on_worker(2, 3) == (12, 13, 14, 15)


def test_initial_placement_with_redundant_slots(tiny):
    table = initial_placement(sched(expert_workers=4, redundant_experts=4), tiny)
    assert table.num_slots == 20 and table.num_redundant == 4 and table.slots_per_worker == 5
    for row in table.phy2log:
        assert row[:16] == tuple(range(16))
        assert row[16:] == (0, 1, 2, 3)


def test_initial_placement_needs_slots_divisible_by_workers(tiny):
    with pytest.raises(ValueError, match="must be divisible by num_workers"):
        initial_placement(sched(expert_workers=3), tiny)


def test_dense_model_cannot_be_placed():
    with pytest.raises(ValueError, match="/models/dense: the model has no routed experts"):
        initial_placement(sched(model="/models/dense"), model_cfg(n_routed_experts=0))


def test_model_without_moe_layers_cannot_be_placed():
    cfg = model_cfg(first_k_dense_replace=3)
    assert cfg.moe_layer_ids == ()
    with pytest.raises(ValueError, match="no routed experts to place"):
        initial_placement(sched(), cfg)


def test_initial_plan_takes_the_flags():
    plan = initial_plan(sched(micro_batches=2, split_policy="even_tokens", min_batch_tokens=7))
    assert (plan.version, plan.micro_batches, plan.split_policy, plan.min_batch_tokens,
            plan.fixed) == (1, 2, "even_tokens", 7, False)
    assert initial_plan(sched(micro_batches=2, fixed_split=True)).fixed
    check_plan(plan)


def test_default_plan_passes_its_own_check():
    plan = initial_plan(sched())
    assert (plan.micro_batches, plan.split_policy) == (1, "balanced_attention")
    check_plan(plan)


@pytest.mark.parametrize("micro_batches", [0, 3])
def test_check_plan_micro_batches(micro_batches):
    plan = pb.OverlapPlan(version=1, micro_batches=micro_batches, split_policy="even_tokens")
    with pytest.raises(ValueError, match=f"micro_batches must be 1 or 2, got {micro_batches}"):
        check_plan(plan)


@pytest.mark.parametrize("policy", ["", "random", "EVEN_TOKENS"])
def test_check_plan_split_policy(policy):
    plan = pb.OverlapPlan(version=1, micro_batches=1, split_policy=policy)
    with pytest.raises(ValueError, match=f"split_policy must be one of .*got {policy!r}"):
        check_plan(plan)


def test_stored_topology_of_the_same_model_fits_whatever_its_worker_count(tiny):
    for workers in (1, 2, 4, 8):
        table = initial_placement(sched(expert_workers=workers), tiny)
        topo = topology_from(table, [f"w{r}:1" for r in range(workers)])
        check_topology_fits(topo, tiny)
        assert table_from(topo) == table


def test_topology_for_another_expert_count_does_not_fit(tiny):
    topo = pb.Topology(version=3, num_workers=4, num_logical_experts=32, layer_ids=[1, 2])
    with pytest.raises(ValueError) as exc_info:
        check_topology_fits(topo, tiny)
    msg = str(exc_info.value)
    assert "stored topology v3 places 32 experts but the model has 16" in msg
    assert "clear the topology bucket" in msg


@pytest.mark.parametrize("layers", [[1], [1, 2, 3], [2, 1], []])
def test_topology_for_other_layers_does_not_fit(tiny, layers):
    topo = pb.Topology(version=2, num_workers=4, num_logical_experts=16, layer_ids=layers)
    with pytest.raises(ValueError, match=r"v2 covers MoE layers \[.*\] but the model's are "
                                         r"\[1, 2\]"):
        check_topology_fits(topo, tiny)
