"""The day's economics as DeepSeek published them: nodes, cost, revenue, margin (pure).

Cost is GPU-hours from the occupancy schedule times the price per GPU-hour. Revenue is the
traffic billed with the price table: `revenue_usd` with its time-of-day tiers (what customers
pay), `theoretical_revenue_usd` with every token at standard prices (DeepSeek's "theoretical
income"). Margin is revenue / cost - 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

from services.economics import money
from services.economics.billing import SPREAD_BY_NODES, PricedPiece, price_traffic
from services.economics.clock import Window
from services.economics.prices import PriceTable
from services.economics.tokens import TokenCounts
from services.economics.usage import DayUsage, Published


@dataclass(frozen=True)
class Occupied:
    """Node occupancy and its cost over some span (the day, an hour, or one phase)."""

    node_hours: Decimal
    avg_nodes: Decimal
    peak_nodes: Decimal
    cost_usd: Decimal


@dataclass(frozen=True)
class HourRow:
    start: int
    end: int
    label: str  # local clock time of the start, in the window's zone
    occupied: Occupied
    tokens: TokenCounts
    revenue_usd: Decimal
    theoretical_revenue_usd: Decimal

    @property
    def margin(self) -> Decimal | None:
        return money.margin(self.revenue_usd, self.occupied.cost_usd)


@dataclass(frozen=True)
class Report:
    window: Window
    gpus_per_node: int
    usd_per_gpu_hour: Decimal
    occupied: Occupied
    gpu_hours: Decimal
    phases: Mapping[str, Occupied]  # empty unless the schedule names phases
    tokens: TokenCounts
    revenue_usd: Decimal
    theoretical_revenue_usd: Decimal
    revenue_by_model: Mapping[str, Decimal]
    revenue_by_tier: Mapping[str, Decimal]
    tokens_by_tier: Mapping[str, TokenCounts]
    hours: tuple[HourRow, ...]
    traffic_timed: bool
    prices_version: str
    prices_source: str
    published: Published | None = None
    notes: tuple[str, ...] = field(default=())
    spread: str = SPREAD_BY_NODES  # how untimed or straddling traffic was shared out

    def __post_init__(self) -> None:
        for name in ("phases", "revenue_by_model", "revenue_by_tier", "tokens_by_tier"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def cost_usd(self) -> Decimal:
        return self.occupied.cost_usd

    @property
    def margin(self) -> Decimal | None:
        return money.margin(self.revenue_usd, self.cost_usd)

    @property
    def theoretical_margin(self) -> Decimal | None:
        return money.margin(self.theoretical_revenue_usd, self.cost_usd)


def compute_report(usage: DayUsage, prices: PriceTable, *, spread: str = SPREAD_BY_NODES) -> Report:
    with money.exact():
        pieces, notes = price_traffic(usage, prices, spread)
        window_seconds = usage.window.seconds
        hour_edges = [0, *usage.window.hour_offsets(), window_seconds]
        hours = tuple(
            _hour_row(usage, start, end, [p for p in pieces if start <= p.start < end])
            for start, end in zip(hour_edges, hour_edges[1:], strict=False)
        )
        return Report(
            window=usage.window,
            gpus_per_node=usage.schedule.gpus_per_node,
            usd_per_gpu_hour=usage.usd_per_gpu_hour,
            occupied=occupancy(usage, 0, window_seconds),
            gpu_hours=money.hours(usage.schedule.gpu_seconds(0, window_seconds)),
            phases={
                phase: occupancy(usage, 0, window_seconds, phase)
                for phase in usage.schedule.phases
                if phase is not None
            },
            tokens=TokenCounts.sum(p.tokens for p in pieces),
            revenue_usd=sum((p.revenue_usd for p in pieces), Decimal(0)),
            theoretical_revenue_usd=sum((p.theoretical_revenue_usd for p in pieces), Decimal(0)),
            revenue_by_model=_group(pieces, lambda p: p.model),
            revenue_by_tier=_group(pieces, lambda p: p.tier),
            tokens_by_tier={
                tier: TokenCounts.sum(p.tokens for p in pieces if p.tier == tier)
                for tier in sorted({p.tier for p in pieces})
            },
            hours=hours,
            traffic_timed=usage.traffic_timed,
            prices_version=prices.version,
            prices_source=prices.source,
            published=usage.published,
            notes=tuple(usage.notes) + tuple(notes),
            spread=spread,
        )


def occupancy(usage: DayUsage, start: int, end: int, phase: str | None = None) -> Occupied:
    schedule = usage.schedule
    gpu_seconds = schedule.gpu_seconds(start, end, phase)
    node_hours = money.div(money.hours(gpu_seconds), schedule.gpus_per_node)
    if phase is None:
        peak = schedule.nodes(schedule.peak_gpus(start, end))
    else:
        points = [start] + [t for t in schedule.edges if start < t < end]
        peak = schedule.nodes(max(schedule.gpus_at(t, phase) for t in points))
    return Occupied(
        node_hours=node_hours,
        avg_nodes=money.div(node_hours, money.hours(end - start)),
        peak_nodes=peak,
        cost_usd=money.div(gpu_seconds * usage.usd_per_gpu_hour, money.SECONDS_PER_HOUR),
    )


def _hour_row(usage: DayUsage, start: int, end: int, pieces: list[PricedPiece]) -> HourRow:
    return HourRow(
        start=start,
        end=end,
        label=usage.window.clock(start),
        occupied=occupancy(usage, start, end),
        tokens=TokenCounts.sum(p.tokens for p in pieces),
        revenue_usd=sum((p.revenue_usd for p in pieces), Decimal(0)),
        theoretical_revenue_usd=sum((p.theoretical_revenue_usd for p in pieces), Decimal(0)),
    )


def _group(pieces: list[PricedPiece], key) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for piece in pieces:
        totals[key(piece)] = totals.get(key(piece), Decimal(0)) + piece.revenue_usd
    return dict(sorted(totals.items()))
