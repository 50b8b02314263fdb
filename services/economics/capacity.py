"""Capacity model: nodes needed for a day's tokens at a given per-node throughput (pure).

Two answers. The fluid one: average prefill nodes = input tokens / (prefill tok/s per node x
seconds), the same for decode with output tokens; with DeepSeek's figures this lands on the
226.75 nodes they observed. The planned one: spread the day over an hourly traffic curve, give
each hour whole deployment units (prefill 4 nodes, decode 18), and bill that schedule.

Cache hits: DeepSeek's prefill figure counts cache hits as input. With `prefill_hit_cost` < 1 a
cache-hit token costs that fraction of a miss, so a node's prefill rate moves with the hit
rate: rate(h) = rate(h_ref) * (h_ref*c + 1 - h_ref) / (h*c + 1 - h).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal

from services.economics import money
from services.economics.schedule import Occupancy, Schedule
from services.economics.tokens import TokenCounts
from services.economics.usage import Deployment, NodeThroughput, TrafficBucket


@dataclass(frozen=True)
class CapacityAssumptions:
    throughput: NodeThroughput
    deployment: Deployment
    gpus_per_node: int
    min_units: int = 1  # per phase, every hour: the service never scales to zero
    prefill_hit_cost: Decimal = Decimal(1)
    reference_hit_fraction: Decimal | None = None  # hit fraction the prefill rate was measured at

    def __post_init__(self) -> None:
        if self.gpus_per_node <= 0:
            raise ValueError("gpus_per_node must be positive")
        if self.min_units < 0:
            raise ValueError("min_units must be >= 0")
        if not Decimal(0) <= self.prefill_hit_cost <= Decimal(1):
            raise ValueError("prefill_hit_cost must be within [0, 1]")
        if self.prefill_hit_cost != 1 and self.reference_hit_fraction is None:
            raise ValueError("prefill_hit_cost < 1 needs the reference hit fraction")

    def prefill_rate(self, hit_fraction: Decimal) -> Decimal:
        """Prefill input tok/s per node at this cache-hit fraction."""
        rate = self.throughput.prefill_input_tok_per_s
        cost = self.prefill_hit_cost
        if cost == 1 or self.reference_hit_fraction is None:
            return rate
        reference = self.reference_hit_fraction
        with money.exact():
            work_at_reference = reference * cost + 1 - reference
            work_now = hit_fraction * cost + 1 - hit_fraction
            if work_now == 0:
                raise ValueError("every input token is a free cache hit: prefill rate unbounded")
            return money.div(rate * work_at_reference, work_now)


@dataclass(frozen=True)
class FluidNodes:
    """Average nodes if nodes followed traffic exactly (no unit rounding, no headroom)."""

    prefill: Decimal
    decode: Decimal
    prefill_rate: Decimal  # tok/s per node used

    @property
    def total(self) -> Decimal:
        return self.prefill + self.decode


def hit_fraction(tokens: TokenCounts) -> Decimal:
    if not tokens.input_total:
        return Decimal(0)
    return money.div(tokens.input_cache_hit, tokens.input_total)


def fluid_nodes(tokens: TokenCounts, seconds: int, assumptions: CapacityAssumptions) -> FluidNodes:
    rate = assumptions.prefill_rate(hit_fraction(tokens))
    with money.exact():
        prefill = money.div(tokens.input_total, rate * seconds)
        decode = money.div(tokens.output, assumptions.throughput.decode_output_tok_per_s * seconds)
    return FluidNodes(prefill, decode, rate)


def with_cache_hit_rate(tokens: TokenCounts, rate: Decimal) -> TokenCounts:
    """The same input and output, with `rate` of the input hitting the cache (whole tokens)."""
    if not Decimal(0) <= rate <= Decimal(1):
        raise ValueError(f"cache hit rate must be within [0, 1], got {rate}")
    with money.exact():
        hit = int((tokens.input_total * rate).to_integral_value(rounding=ROUND_HALF_EVEN))
    return TokenCounts(hit, tokens.input_total - hit, tokens.output)


def integer_weights(values: Sequence[Decimal]) -> list[int]:
    """Decimal weights scaled exactly to integers (0.25, 1.5 -> 25, 150)."""
    if any(v < 0 for v in values):
        raise ValueError("curve weights must be >= 0")
    places = max((-v.as_tuple().exponent for v in values if v.as_tuple().exponent < 0), default=0)
    return [int(v.scaleb(places)) for v in values]


def hourly_traffic(
    totals: Mapping[str, TokenCounts], slots: Sequence[tuple[int, int]], weights: Sequence[int]
) -> list[TrafficBucket]:
    """Each model's day totals shared over the slots in proportion to the curve, whole tokens."""
    if len(slots) != len(weights):
        raise ValueError(f"the curve has {len(weights)} weights for {len(slots)} hours")
    if not any(weights):
        raise ValueError("the traffic curve is all zeros")
    buckets = []
    for model, tokens in totals.items():
        hits = money.apportion(tokens.input_cache_hit, weights)
        misses = money.apportion(tokens.input_cache_miss, weights)
        outputs = money.apportion(tokens.output, weights)
        for (start, end), h, m, o in zip(slots, hits, misses, outputs, strict=True):
            if h or m or o:
                buckets.append(TrafficBucket(start, end, model, TokenCounts(h, m, o)))
    return buckets


def units_needed(nodes: Decimal, unit_nodes: int, min_units: int) -> int:
    units = int((nodes / unit_nodes).to_integral_value(rounding=ROUND_CEILING))
    return max(units, min_units)


def plan_schedule(
    traffic: Sequence[TrafficBucket],
    slots: Sequence[tuple[int, int]],
    assumptions: CapacityAssumptions,
) -> Schedule:
    """Whole prefill and decode units per slot, enough for that slot's tokens."""
    deployment = assumptions.deployment
    intervals = []
    for start, end in slots:
        tokens = TokenCounts.sum(b.tokens for b in traffic if start <= b.start < end)
        need = fluid_nodes(tokens, end - start, assumptions)
        prefill_units = units_needed(
            need.prefill, deployment.prefill_unit_nodes, assumptions.min_units
        )
        decode_units = units_needed(
            need.decode, deployment.decode_unit_nodes, assumptions.min_units
        )
        for phase, nodes in (
            ("prefill", prefill_units * deployment.prefill_unit_nodes),
            ("decode", decode_units * deployment.decode_unit_nodes),
        ):
            intervals.append(Occupancy(start, end, nodes * assumptions.gpus_per_node, phase))
    return Schedule(tuple(intervals), assumptions.gpus_per_node)
