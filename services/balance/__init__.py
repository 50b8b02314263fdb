"""Load balancers, all pure (no I/O): prefill and decode request balancers for the router,
and the expert-parallel load balancer (EPLB) with its PlacementTable for the scheduler.
See docs/balance.md."""

from services.balance.decode_lb import DecodeBalancer, DecodeBalancerConfig, DecodeInstanceLoad
from services.balance.eplb import EplbConfig, Policy, plan, should_rebalance
from services.balance.ledger import NoEligibleInstance
from services.balance.naive import balancedness, contiguous_placement
from services.balance.placement import PlacementTable
from services.balance.prefill_lb import PrefillBalancer, PrefillBalancerConfig, PrefillInstanceLoad
from services.common.states import InstanceState

__all__ = [
    "DecodeBalancer",
    "DecodeBalancerConfig",
    "DecodeInstanceLoad",
    "EplbConfig",
    "InstanceState",
    "NoEligibleInstance",
    "PlacementTable",
    "Policy",
    "PrefillBalancer",
    "PrefillBalancerConfig",
    "PrefillInstanceLoad",
    "balancedness",
    "contiguous_placement",
    "plan",
    "should_rebalance",
]
