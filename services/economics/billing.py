"""Price a day's traffic: cut it at every boundary that matters, then bill each piece.

Boundaries are the hours of the window, the occupancy changes, the traffic buckets' own edges
and every price-tier switch, so each piece lies in one hour and under one tier. A bucket that
spans several pieces (a day total, or an hourly row across 16:30 UTC) is shared out in whole
tokens in proportion to the GPU-seconds of each piece ("nodes", DeepSeek scaled its nodes with
its traffic) or to its length ("uniform"). A piece is priced by the tier in force at its start.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from decimal import Decimal

from services.economics import money
from services.economics.prices import PriceTable
from services.economics.tokens import TokenCounts
from services.economics.usage import DayUsage, TrafficBucket

SPREAD_BY_NODES = "nodes"
SPREAD_UNIFORM = "uniform"
SPREADS = (SPREAD_BY_NODES, SPREAD_UNIFORM)


@dataclass(frozen=True)
class PricedPiece:
    start: int
    end: int
    model: str
    tier: str
    tokens: TokenCounts
    revenue_usd: Decimal  # with the tier in force at `start`
    theoretical_revenue_usd: Decimal  # at the model's standard prices


def price_traffic(
    usage: DayUsage, prices: PriceTable, spread: str = SPREAD_BY_NODES
) -> tuple[list[PricedPiece], list[str]]:
    """All pieces of the day's traffic, priced, and notes stating any assumption used."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    edges = segment_edges(usage, prices)
    tier_edges = set(prices.boundary_offsets(usage.window))
    pieces: list[PricedPiece] = []
    straddling = 0
    for bucket in usage.traffic:
        if any(bucket.start < t < bucket.end for t in tier_edges):
            straddling += 1
        for start, end, tokens in _split(bucket, edges, usage, spread):
            tier, model_prices = prices.price(bucket.model, usage.window.at(start))
            pieces.append(
                PricedPiece(
                    start=start,
                    end=end,
                    model=bucket.model,
                    tier=tier,
                    tokens=tokens,
                    revenue_usd=model_prices.charge(tokens),
                    theoretical_revenue_usd=prices.standard(bucket.model).charge(tokens),
                )
            )
    return pieces, _notes(usage, spread, straddling)


def segment_edges(usage: DayUsage, prices: PriceTable) -> list[int]:
    window_end = usage.window.seconds
    edges = {0, window_end}
    edges.update(usage.window.hour_offsets())
    edges.update(usage.schedule.edges)
    edges.update(t for bucket in usage.traffic for t in (bucket.start, bucket.end))
    edges.update(prices.boundary_offsets(usage.window))
    return sorted(t for t in edges if 0 <= t <= window_end)


def _split(
    bucket: TrafficBucket, edges: list[int], usage: DayUsage, spread: str
) -> list[tuple[int, int, TokenCounts]]:
    inner = edges[bisect_right(edges, bucket.start) : bisect_left(edges, bucket.end)]
    bounds = [bucket.start, *inner, bucket.end]
    spans = list(zip(bounds, bounds[1:], strict=False))
    if len(spans) == 1:
        return [(bucket.start, bucket.end, bucket.tokens)]
    lengths = [end - start for start, end in spans]
    weights = lengths
    if spread == SPREAD_BY_NODES:
        busy = [usage.schedule.gpu_seconds(start, end) for start, end in spans]
        weights = busy if any(busy) else lengths  # nothing ran: fall back to time
    hits = money.apportion(bucket.tokens.input_cache_hit, weights)
    misses = money.apportion(bucket.tokens.input_cache_miss, weights)
    outputs = money.apportion(bucket.tokens.output, weights)
    return [
        (start, end, TokenCounts(h, m, o))
        for (start, end), h, m, o in zip(spans, hits, misses, outputs, strict=True)
    ]


def _notes(usage: DayUsage, spread: str, straddling: int) -> list[str]:
    how = (
        "in proportion to the node schedule (GPU-hours in each piece)"
        if spread == SPREAD_BY_NODES
        else "uniformly in time"
    )
    if not usage.traffic_timed:
        return [
            f"no hourly token data: the day's tokens are spread over the window {how}, in whole "
            "tokens; each share is priced by the tier in force when it starts"
        ]
    if straddling:
        return [
            f"{straddling} traffic row(s) straddle a price-tier boundary: their tokens are split "
            f"at the boundary {how}"
        ]
    return []
