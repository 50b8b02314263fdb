"""A day's economics as DeepSeek published them: nodes, cost, revenue, margin (pure).

Cost is GPU-hours times the GPU-hour price. Revenue bills the traffic: `revenue_usd` with the
time-of-day tiers, `theoretical_revenue_usd` at standard prices (DeepSeek's "theoretical income").
The day is cut at every hour, occupancy change, traffic edge and tier switch, so each piece lies
in one hour under one tier, priced by the tier in force at its start. A bucket over several
pieces (a day total; an hourly row across 16:30 UTC) is shared out in whole tokens by each
piece's GPU-seconds ("nodes": DeepSeek scaled nodes with traffic) or its length ("uniform").
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from services.economics import money
from services.economics.money import TokenCounts
from services.economics.prices import PriceTable
from services.economics.usage import DayUsage, Published, TrafficBucket
from services.economics.window import Window

SPREAD_BY_NODES, SPREAD_UNIFORM = "nodes", "uniform"
SPREADS = (SPREAD_BY_NODES, SPREAD_UNIFORM)


@dataclass(frozen=True)
class Piece:
    """Tokens of one model from `start` on, priced with the tier in force at `start`."""

    start: int
    model: str
    tier: str
    tokens: TokenCounts
    revenue_usd: Decimal
    theoretical_revenue_usd: Decimal  # at the model's standard prices


@dataclass(frozen=True)
class Occupied:
    """Node occupancy and its cost over some span (the day, an hour, or one phase)."""

    node_hours: Decimal
    avg_nodes: Decimal
    peak_nodes: Decimal
    cost_usd: Decimal


@dataclass(frozen=True)
class Billed:
    """What a span (the day, or an hour of it) cost and earned."""

    occupied: Occupied
    tokens: TokenCounts
    revenue_usd: Decimal  # as billed: time-of-day tiers applied
    theoretical_revenue_usd: Decimal  # every token at standard prices

    @property
    def cost_usd(self) -> Decimal:
        return self.occupied.cost_usd

    @property
    def margin(self) -> Decimal | None:
        return money.margin(self.revenue_usd, self.cost_usd)

    @property
    def theoretical_margin(self) -> Decimal | None:
        return money.margin(self.theoretical_revenue_usd, self.cost_usd)


@dataclass(frozen=True)
class HourRow(Billed):
    start: int
    end: int
    label: str  # local clock time of the start, in the window's zone


@dataclass(frozen=True)
class Report(Billed):
    window: Window
    usd_per_gpu_hour: Decimal
    gpus_per_node: int
    gpu_hours: Decimal
    phases: Mapping[str, Occupied]  # empty unless the schedule names phases
    revenue_by_model: Mapping[str, Decimal]
    revenue_by_tier: Mapping[str, Decimal]
    tokens_by_tier: Mapping[str, TokenCounts]
    hours: tuple[HourRow, ...]
    traffic_timed: bool
    prices: PriceTable
    published: Published | None
    notes: tuple[str, ...]
    spread: str  # how untimed or straddling traffic was shared out


def compute_report(usage: DayUsage, prices: PriceTable, *, spread: str = SPREAD_BY_NODES) -> Report:
    with money.exact():
        pieces, notes = price_traffic(usage, prices, spread)
        end, by_tier = usage.window.seconds, _group(pieces, "tier")
        hours = tuple(
            HourRow(occupancy(usage, a, b), *_sums([p for p in pieces if a <= p.start < b]),
                    start=a, end=b, label=usage.window.clock(a))
            for a, b in usage.window.hour_slots())
        return Report(
            occupancy(usage, 0, end), *_sums(pieces), usage.window, usage.usd_per_gpu_hour,
            usage.schedule.gpus_per_node, money.hours(usage.schedule.gpu_seconds(0, end)),
            phases={p: occupancy(usage, 0, end, p) for p in usage.schedule.phases if p},
            revenue_by_model={k: sums[1] for k, sums in _group(pieces, "model").items()},
            revenue_by_tier={k: sums[1] for k, sums in by_tier.items()},
            tokens_by_tier={k: sums[0] for k, sums in by_tier.items()},
            hours=hours, traffic_timed=usage.traffic_timed, prices=prices,
            published=usage.published, notes=usage.notes + tuple(notes), spread=spread)


def occupancy(usage: DayUsage, start: int, end: int, phase: str | None = None) -> Occupied:
    schedule = usage.schedule
    gpu_seconds = schedule.gpu_seconds(start, end, phase)
    node_hours = money.div(money.hours(gpu_seconds), schedule.gpus_per_node)
    return Occupied(node_hours, money.div(node_hours, money.hours(end - start)),
                    schedule.nodes(schedule.peak_gpus(start, end, phase)),
                    money.div(gpu_seconds * usage.usd_per_gpu_hour, money.SECONDS_PER_HOUR))


def price_traffic(usage: DayUsage, prices: PriceTable, spread: str = SPREAD_BY_NODES
                  ) -> tuple[list[Piece], list[str]]:
    """All pieces of the day's traffic, priced, and notes stating any assumption used."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    edges, tier_edges = cut_points(usage, prices), prices.boundary_offsets(usage.window)
    pieces, straddling = [], 0
    for bucket in usage.traffic:
        straddling += any(bucket.start < t < bucket.end for t in tier_edges)
        standard = prices.standard(bucket.model)
        for start, tokens in _split(bucket, edges, usage, spread):
            tier, tier_prices = prices.price(bucket.model, usage.window.at(start))
            pieces.append(Piece(start, bucket.model, tier, tokens, tier_prices.charge(tokens),
                                standard.charge(tokens)))
    how = ("in proportion to the node schedule (GPU-hours in each piece)"
           if spread == SPREAD_BY_NODES else "uniformly in time")
    if not usage.traffic_timed:
        return pieces, [f"no hourly token data: the day's tokens are spread over the window {how}, "
                        "in whole tokens; each share is priced by the tier in force when it starts"]
    if straddling:
        return pieces, [f"{straddling} traffic row(s) straddle a price-tier boundary: their "
                        f"tokens are split at the boundary {how}"]
    return pieces, []


def cut_points(usage: DayUsage, prices: PriceTable) -> list[int]:
    """0, the window end, and every hour, occupancy change, traffic edge and tier switch."""
    edges = {0, usage.window.seconds, *usage.window.hour_offsets(), *usage.schedule.edges,
             *prices.boundary_offsets(usage.window)}
    edges.update(t for bucket in usage.traffic for t in (bucket.start, bucket.end))
    return sorted(t for t in edges if 0 <= t <= usage.window.seconds)


def _split(bucket: TrafficBucket, edges: list[int], usage: DayUsage, spread: str
           ) -> list[tuple[int, TokenCounts]]:
    """The bucket's tokens shared over the pieces it spans: (start of the piece, tokens)."""
    inner = edges[bisect_right(edges, bucket.start):bisect_left(edges, bucket.end)]
    spans = list(zip([bucket.start, *inner], [*inner, bucket.end], strict=True))
    weights = [end - start for start, end in spans]
    busy = [usage.schedule.gpu_seconds(start, end) for start, end in spans]
    if spread == SPREAD_BY_NODES and any(busy):  # nothing ran at all: fall back to time
        weights = busy
    return [(a, t) for (a, _), t in zip(spans, bucket.tokens.split(weights), strict=True)]


def _sums(pieces: list[Piece]) -> tuple[TokenCounts, Decimal, Decimal]:
    """Tokens, revenue as billed and theoretical revenue of some pieces."""
    return (TokenCounts.sum(p.tokens for p in pieces),
            sum((p.revenue_usd for p in pieces), Decimal(0)),
            sum((p.theoretical_revenue_usd for p in pieces), Decimal(0)))


def _group(pieces: list[Piece], attribute: str) -> dict[str, tuple[TokenCounts, Decimal, Decimal]]:
    """`_sums` per model or per tier, in name order."""
    keys = sorted({getattr(p, attribute) for p in pieces})
    return {k: _sums([p for p in pieces if getattr(p, attribute) == k]) for k in keys}
