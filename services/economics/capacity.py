"""Capacity what-ifs (pure): the nodes a day's tokens need at a per-node throughput ("fluid":
input tokens / (prefill tok/s x seconds), output likewise; DeepSeek's figures give its 226.75
nodes), and an hourly plan of whole deployment units, billed like any day.

DeepSeek's prefill rate counts cache hits as input. With `prefill_hit_cost` c < 1 a hit costs c
of a miss, so the rate moves with the hit fraction h:
rate(h) = rate(h_ref) * (h_ref * c + 1 - h_ref) / (h * c + 1 - h).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal

from services.economics import money, usage
from services.economics.money import TokenCounts
from services.economics.prices import PriceTable
from services.economics.report import Report, compute_report, occupancy
from services.economics.spec import DataError
from services.economics.usage import DayUsage, Occupancy, Schedule, TrafficBucket


@dataclass(frozen=True)
class CapacityAssumptions:
    throughput: usage.NodeThroughput
    deployment: usage.Deployment
    gpus_per_node: int
    min_units: int = 1  # per phase, every hour: the service never scales to zero
    prefill_hit_cost: Decimal = Decimal(1)
    reference_hit_fraction: Decimal | None = None  # hit fraction the prefill rate was measured at

    def __post_init__(self) -> None:
        rates, units = self.throughput, self.deployment
        if rates.prefill_input_tok_per_s <= 0 or rates.decode_output_tok_per_s <= 0:
            raise ValueError("per-node throughputs must be > 0")
        if units.prefill_unit_nodes <= 0 or units.decode_unit_nodes <= 0:
            raise ValueError("deployment unit sizes must be positive")
        if self.min_units < 0:
            raise ValueError("min_units must be >= 0")
        if not 0 <= self.prefill_hit_cost <= 1:
            raise ValueError("prefill_hit_cost must be within [0, 1]")
        if self.prefill_hit_cost != 1 and self.reference_hit_fraction is None:
            raise ValueError("prefill_hit_cost < 1 needs the reference hit fraction")

    def prefill_rate(self, hit_fraction: Decimal) -> Decimal:
        """Prefill input tok/s per node at this cache-hit fraction."""
        rate, cost, reference = (self.throughput.prefill_input_tok_per_s, self.prefill_hit_cost,
                                 self.reference_hit_fraction)
        if cost == 1 or reference is None:
            return rate
        with money.exact():
            if (work := hit_fraction * cost + 1 - hit_fraction) == 0:
                raise ValueError("every input token is a free cache hit: prefill rate unbounded")
            return money.div(rate * (reference * cost + 1 - reference), work)


@dataclass(frozen=True)
class FluidNodes:
    """Average nodes if nodes followed traffic exactly (no unit rounding, no headroom)."""

    prefill: Decimal
    decode: Decimal
    prefill_rate: Decimal  # tok/s per node used

    @property
    def total(self) -> Decimal:
        return self.prefill + self.decode


@dataclass(frozen=True)
class CapacityPlan:
    tokens: TokenCounts
    fluid: FluidNodes
    observed_avg_nodes: Decimal  # the usage schedule's
    fluid_vs_observed: Decimal | None
    curve_source: str
    assumptions: CapacityAssumptions
    usage: DayUsage  # the planned day: hourly traffic on the planned schedule
    report: Report
    planned_nodes: tuple[tuple[Decimal, Decimal], ...]  # hour by hour: (prefill, decode)


def hit_fraction(tokens: TokenCounts) -> Decimal:
    return money.div(tokens.input_cache_hit, tokens.input_total or 1)


def fluid_nodes(tokens: TokenCounts, seconds: int, assumptions: CapacityAssumptions) -> FluidNodes:
    rate = assumptions.prefill_rate(hit_fraction(tokens))
    with money.exact():
        prefill = money.div(tokens.input_total, rate * seconds)
        decode = money.div(tokens.output, assumptions.throughput.decode_output_tok_per_s * seconds)
        return FluidNodes(prefill, decode, rate)


def with_cache_hit_rate(tokens: TokenCounts, rate: Decimal) -> TokenCounts:
    """The same input and output, with `rate` of the input hitting the cache (whole tokens)."""
    if not 0 <= rate <= 1:
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


def default_curve(day: DayUsage, prices: PriceTable) -> tuple[list[int], str]:
    """The day's own hourly tokens when it has them, else the shape of its node schedule."""
    if day.traffic_timed:
        hours = compute_report(day, prices).hours
        return [h.tokens.total for h in hours], "the usage file's hourly token counts"
    return ([day.schedule.gpu_seconds(*h) for h in day.window.hour_slots()],
            "the usage file's node schedule (GPU-hours per hour)")


def hourly_traffic(totals: Mapping[str, TokenCounts], slots: Sequence[tuple[int, int]],
                   weights: Sequence[int]) -> list[TrafficBucket]:
    """Each model's day totals shared over the slots in proportion to the curve, whole tokens."""
    if len(slots) != len(weights):
        raise DataError("weights", f"has {len(weights)} values, the window has {len(slots)} hours")
    if not any(weights):
        raise DataError("weights", "all zero")
    return [TrafficBucket(a, b, model, share) for model, tokens in totals.items()
            for (a, b), share in zip(slots, tokens.split(weights), strict=True) if share.total]


def units_needed(nodes: Decimal, unit_nodes: int, min_units: int) -> int:
    return max(int((nodes / unit_nodes).to_integral_value(rounding=ROUND_CEILING)), min_units)


def plan_schedule(traffic: Sequence[TrafficBucket], slots: Sequence[tuple[int, int]],
                  assumptions: CapacityAssumptions) -> Schedule:
    """Whole prefill and decode units per slot, enough for that slot's tokens."""
    unit, intervals = assumptions.deployment, []
    for start, end in slots:
        need = fluid_nodes(TokenCounts.sum(b.tokens for b in traffic if start <= b.start < end),
                           end - start, assumptions)
        for phase, nodes, size in (("prefill", need.prefill, unit.prefill_unit_nodes),
                                   ("decode", need.decode, unit.decode_unit_nodes)):
            units = units_needed(nodes, size, assumptions.min_units)
            intervals.append(Occupancy(start, end, units * size * assumptions.gpus_per_node, phase))
    return Schedule(tuple(intervals), assumptions.gpus_per_node)


def plan_capacity(day: DayUsage, prices: PriceTable, assumptions: CapacityAssumptions, *,
                  totals: Mapping[str, TokenCounts], curve: Sequence[int], curve_source: str,
                  usd_per_gpu_hour: Decimal) -> CapacityPlan:
    slots, end = day.window.hour_slots(), day.window.seconds
    traffic = hourly_traffic(totals, slots, curve)
    schedule = plan_schedule(traffic, slots, assumptions)
    planned = replace(day, schedule=schedule, usd_per_gpu_hour=usd_per_gpu_hour,
                      traffic=tuple(traffic), traffic_timed=True, published=None, notes=())
    hours = tuple(tuple(schedule.nodes(schedule.gpus_at(start, phase))
                        for phase in ("prefill", "decode")) for start, _ in slots)
    tokens, observed = TokenCounts.sum(totals.values()), occupancy(day, 0, end).avg_nodes
    fluid = fluid_nodes(tokens, end, assumptions)
    return CapacityPlan(tokens, fluid, observed, money.relative_difference(fluid.total, observed),
                        curve_source, assumptions, planned, compute_report(planned, prices), hours)
