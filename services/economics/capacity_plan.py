"""What-if capacity planning over a day of usage (pure): tokens -> hourly node plan -> report.

The day's totals come from the usage (optionally overridden: cache hit rate, token counts),
are shared over the hours by a traffic curve, sized into whole deployment units hour by hour,
and the resulting schedule is billed like any other day, so cost, revenue and margin follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType

from services.economics import money
from services.economics.capacity import (
    CapacityAssumptions,
    FluidNodes,
    fluid_nodes,
    hourly_traffic,
    plan_schedule,
)
from services.economics.prices import PriceTable
from services.economics.report import Report, compute_report, occupancy
from services.economics.tokens import TokenCounts
from services.economics.usage import DayUsage

CURVE_FROM_TRAFFIC = "the usage file's hourly token counts"
CURVE_FROM_NODES = "the usage file's node schedule (GPU-hours per hour)"


@dataclass(frozen=True)
class PlannedHour:
    label: str
    prefill_nodes: Decimal
    decode_nodes: Decimal


@dataclass(frozen=True)
class CapacityPlan:
    totals: Mapping[str, TokenCounts]
    fluid: FluidNodes
    observed_avg_nodes: Decimal
    curve_source: str
    assumptions: CapacityAssumptions
    usage: DayUsage  # the planned day: hourly traffic on the planned schedule
    report: Report
    planned_hours: tuple[PlannedHour, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "totals", MappingProxyType(dict(self.totals)))

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts.sum(self.totals.values())

    @property
    def fluid_vs_observed(self) -> Decimal | None:
        return money.relative_difference(self.fluid.total, self.observed_avg_nodes)


def hour_slots(usage: DayUsage) -> list[tuple[int, int]]:
    edges = [0, *usage.window.hour_offsets(), usage.window.seconds]
    return list(zip(edges, edges[1:], strict=False))


def default_curve(usage: DayUsage, prices: PriceTable) -> tuple[list[int], str]:
    """The usage's own hourly tokens when it has them, else the shape of its node schedule."""
    if usage.traffic_timed:
        hours = compute_report(usage, prices).hours
        return [row.tokens.total for row in hours], CURVE_FROM_TRAFFIC
    schedule = usage.schedule
    return [schedule.gpu_seconds(a, b) for a, b in hour_slots(usage)], CURVE_FROM_NODES


def plan_capacity(
    usage: DayUsage,
    prices: PriceTable,
    assumptions: CapacityAssumptions,
    *,
    totals: Mapping[str, TokenCounts],
    curve: Sequence[int],
    curve_source: str,
    usd_per_gpu_hour: Decimal,
) -> CapacityPlan:
    slots = hour_slots(usage)
    traffic = hourly_traffic(totals, slots, curve)
    schedule = plan_schedule(traffic, slots, assumptions)
    planned = replace(
        usage,
        schedule=schedule,
        usd_per_gpu_hour=usd_per_gpu_hour,
        traffic=tuple(traffic),
        traffic_timed=True,
        published=None,
        notes=(),
    )
    planned_hours = tuple(
        PlannedHour(
            label=usage.window.clock(start),
            prefill_nodes=schedule.nodes(schedule.gpus_at(start, "prefill")),
            decode_nodes=schedule.nodes(schedule.gpus_at(start, "decode")),
        )
        for start, _ in slots
    )
    return CapacityPlan(
        totals=totals,
        fluid=fluid_nodes(TokenCounts.sum(totals.values()), usage.window.seconds, assumptions),
        observed_avg_nodes=occupancy(usage, 0, usage.window.seconds).avg_nodes,
        curve_source=curve_source,
        assumptions=assumptions,
        usage=planned,
        report=compute_report(planned, prices),
        planned_hours=planned_hours,
    )
