"""What the scheduler writes when NATS holds no state yet, and the check that stored state fits
the model it was started with (pure: no I/O)."""

from __future__ import annotations

from services.balance.naive import contiguous_placement
from services.balance.placement import PlacementTable
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import control_pb2
from services.scheduler.config import SPLIT_POLICIES, SchedulerConfig

FIRST_VERSION = 1


def initial_placement(cfg: SchedulerConfig, model_cfg: ModelConfig) -> PlacementTable:
    """Experts laid out contiguously over E workers with R redundant slots, version 1."""
    if not model_cfg.n_routed_experts or not model_cfg.moe_layer_ids:
        raise ValueError(f"{cfg.model}: the model has no routed experts to place")
    return contiguous_placement(model_cfg.n_routed_experts, cfg.expert_workers,
                                model_cfg.moe_layer_ids, redundant=cfg.redundant_experts,
                                version=FIRST_VERSION)


def initial_plan(cfg: SchedulerConfig) -> control_pb2.OverlapPlan:
    return control_pb2.OverlapPlan(version=FIRST_VERSION, micro_batches=cfg.micro_batches,
                                   split_policy=cfg.split_policy,
                                   min_batch_tokens=cfg.min_batch_tokens,
                                   fixed=cfg.fixed_split)


def check_plan(plan: control_pb2.OverlapPlan) -> None:
    """ValueError unless every field of `plan` is one the attention instances understand."""
    if plan.micro_batches not in (1, 2):
        raise ValueError(f"micro_batches must be 1 or 2, got {plan.micro_batches}")
    if plan.split_policy not in SPLIT_POLICIES:
        raise ValueError(
            f"split_policy must be one of {list(SPLIT_POLICIES)}, got {plan.split_policy!r}")


def check_topology_fits(topo: control_pb2.Topology, model_cfg: ModelConfig) -> None:
    """ValueError when a stored topology was made for another model (expert count or layers).

    A different worker count is fine: the stored topology wins over the flags, which only seed
    an empty bucket."""
    if topo.num_logical_experts != model_cfg.n_routed_experts:
        raise ValueError(
            f"stored topology v{topo.version} places {topo.num_logical_experts} experts but the "
            f"model has {model_cfg.n_routed_experts}; clear the topology bucket to start over")
    if tuple(topo.layer_ids) != tuple(model_cfg.moe_layer_ids):
        raise ValueError(
            f"stored topology v{topo.version} covers MoE layers {list(topo.layer_ids)} but the "
            f"model's are {list(model_cfg.moe_layer_ids)}; clear the topology bucket to start over")
