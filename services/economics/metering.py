"""From per-request usage records (what the router emits) to a day of usage (pure).

Each record is priced by the tier in force when its request started. Records are aggregated
into buckets on a fixed grid (hourly by default) that is also cut at every tier switch, so no
bucket straddles a price change and billing the buckets gives exactly the per-record total.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType

from services.economics import money
from services.economics.clock import Window
from services.economics.prices import PriceTable
from services.economics.schedule import Schedule
from services.economics.tokens import TokenCounts
from services.economics.usage import DayUsage, TrafficBucket


@dataclass(frozen=True)
class UsageRecord:
    """One request's usage, as in the API's `usage` object."""

    started_at: datetime
    model: str
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    completion_tokens: int
    request_id: str = ""

    def __post_init__(self) -> None:
        if self.started_at.tzinfo is None:
            raise ValueError("started_at must be timezone-aware")
        if not self.model:
            raise ValueError("model must be non-empty")
        TokenCounts(  # validates the counts: whole and >= 0
            self.prompt_cache_hit_tokens, self.prompt_cache_miss_tokens, self.completion_tokens
        )

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts(
            self.prompt_cache_hit_tokens, self.prompt_cache_miss_tokens, self.completion_tokens
        )


@dataclass(frozen=True)
class MeteredTraffic:
    buckets: tuple[TrafficBucket, ...]
    revenue_usd: Decimal  # the sum over records, each at the tier in force at its start
    theoretical_revenue_usd: Decimal  # every record at standard prices
    revenue_by_tier: Mapping[str, Decimal] = field(default_factory=dict)
    records: int = 0
    outside_window: int = 0  # records that started outside the window (not billed here)

    def __post_init__(self) -> None:
        object.__setattr__(self, "revenue_by_tier", MappingProxyType(dict(self.revenue_by_tier)))


def price_record(record: UsageRecord, prices: PriceTable) -> tuple[str, Decimal]:
    """(tier, USD) for one request, by the tier in force when it started."""
    tier, model_prices = prices.price(record.model, record.started_at)
    return tier, model_prices.charge(record.tokens)


def aggregate_records(
    records: Iterable[UsageRecord],
    window: Window,
    prices: PriceTable,
    *,
    bucket_seconds: int = 3600,
) -> MeteredTraffic:
    if bucket_seconds <= 0:
        raise ValueError("bucket_seconds must be positive")
    edges = sorted(
        set(range(0, window.seconds, bucket_seconds)) | set(prices.boundary_offsets(window))
    )
    sums: dict[tuple[int, str], TokenCounts] = {}
    by_tier: dict[str, Decimal] = {}
    revenue = theoretical = Decimal(0)
    count = outside = 0
    with money.exact():
        for record in records:
            count += 1
            offset = window.offset_of(record.started_at)
            if not 0 <= offset < window.seconds:
                outside += 1
                continue
            tier, charge = price_record(record, prices)
            revenue += charge
            theoretical += prices.standard(record.model).charge(record.tokens)
            by_tier[tier] = by_tier.get(tier, Decimal(0)) + charge
            k = bisect_right(edges, int(offset)) - 1
            key = (k, record.model)
            sums[key] = sums.get(key, TokenCounts()) + record.tokens
    bounds = [*edges, window.seconds]
    buckets = tuple(
        TrafficBucket(bounds[k], bounds[k + 1], model, tokens)
        for (k, model), tokens in sorted(sums.items())
    )
    return MeteredTraffic(
        buckets, revenue, theoretical, dict(sorted(by_tier.items())), count, outside
    )


def day_usage_from_records(
    records: Iterable[UsageRecord],
    window: Window,
    schedule: Schedule,
    usd_per_gpu_hour: Decimal,
    prices: PriceTable,
    *,
    bucket_seconds: int = 3600,
) -> tuple[DayUsage, MeteredTraffic]:
    """A DayUsage ready for `compute_report`, plus the per-record billing to check it against."""
    metered = aggregate_records(records, window, prices, bucket_seconds=bucket_seconds)
    usage = DayUsage(
        window=window,
        schedule=schedule,
        usd_per_gpu_hour=usd_per_gpu_hour,
        traffic=metered.buckets,
        traffic_timed=True,
        prices=prices,
    )
    return usage, metered
