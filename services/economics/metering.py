"""Per-request usage records (what the router publishes to JetStream) folded into a day of usage.

UsageRecord is the protobuf epserve.v1.UsageRecord as a dataclass with its fields. Each record is
priced by the tier in force at its start; the hourly buckets (a usage file's `hourly_tokens`
rows) are also cut at every tier switch, so that none straddles a price change.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal

from services.economics import money
from services.economics.money import TokenCounts
from services.economics.prices import PriceTable
from services.economics.usage import DayUsage, Schedule, TrafficBucket
from services.economics.window import Window
from services.protos_gen.epserve.v1 import control_pb2

_TIMES = ("started_at", "finished_at")  # unix seconds in the protobuf, datetimes here


@dataclass(frozen=True, kw_only=True)
class UsageRecord:
    """One request's usage; the fields of control_pb2.UsageRecord, in its order."""

    request_id: str = ""
    model: str
    started_at: datetime
    finished_at: datetime | None = None
    prompt_tokens: int | None = None  # None: prompt_cache_hit_tokens + prompt_cache_miss_tokens
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    prefill_instance: str = ""
    decode_instance: str = ""
    time_to_first_token_s: float = 0.0
    usage_id: str = ""  # server-assigned, the JetStream message id (request_id is the client's)
    migrations: int = 0  # times the request moved to another decode instance
    tenant: str = ""  # who is billed ("" until API keys name tenants)

    def __post_init__(self) -> None:
        if any(t is not None and t.tzinfo is None for t in (self.started_at, self.finished_at)):
            raise ValueError("started_at and finished_at must be timezone-aware")
        if not self.model:
            raise ValueError("model must be non-empty")
        prompt = self.tokens.input_total  # TokenCounts checks the counts are whole and >= 0
        if self.prompt_tokens is None:
            object.__setattr__(self, "prompt_tokens", prompt)
        elif self.prompt_tokens != prompt:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) must equal "
                             f"prompt_cache_hit_tokens + prompt_cache_miss_tokens ({prompt})")

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts(self.prompt_cache_hit_tokens, self.prompt_cache_miss_tokens,
                           self.completion_tokens)

    @classmethod
    def from_proto(cls, msg: control_pb2.UsageRecord) -> UsageRecord:
        """An unset (zero) finished_at reads as None, an unset prompt_tokens as hit + miss."""
        values = {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
        for name in _TIMES:
            values[name] = datetime.fromtimestamp(values[name], UTC) if values[name] else None
        return cls(**{**values, "prompt_tokens": values["prompt_tokens"] or None})

    def to_proto(self) -> control_pb2.UsageRecord:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _TIMES:
            values[name] = values[name].timestamp() if values[name] else 0.0
        return control_pb2.UsageRecord(**values)


@dataclass(frozen=True)
class MeteredTraffic:
    buckets: tuple[TrafficBucket, ...]
    revenue_usd: Decimal  # the sum over records, each at the tier in force at its start
    theoretical_revenue_usd: Decimal  # every record at standard prices
    revenue_by_tier: Mapping[str, Decimal]
    records: int
    outside_window: int  # records that started outside the window (not billed here)


def price_record(record: UsageRecord, prices: PriceTable) -> tuple[str, Decimal]:
    """(tier, USD) for one request, by the tier in force when it started."""
    tier, model_prices = prices.price(record.model, record.started_at)
    return tier, model_prices.charge(record.tokens)


def aggregate_records(records: Iterable[UsageRecord], window: Window, prices: PriceTable
                      ) -> MeteredTraffic:
    """Records bucketed per model by the hour (from the window start) and the tier switches."""
    edges = sorted({*range(0, window.seconds, 3600), *prices.boundary_offsets(window)})
    sums: dict[tuple[int, str], TokenCounts] = {}
    by_tier: dict[str, Decimal] = {}
    revenue, theoretical, count_all, outside = Decimal(0), Decimal(0), 0, 0
    with money.exact():
        for record in records:
            count_all += 1
            offset = (record.started_at - window.start).total_seconds()
            if not 0 <= offset < window.seconds:
                outside += 1
                continue
            tier, charge = price_record(record, prices)
            revenue += charge
            theoretical += prices.standard(record.model).charge(record.tokens)
            by_tier[tier] = by_tier.get(tier, Decimal(0)) + charge
            key = (bisect_right(edges, int(offset)) - 1, record.model)
            sums[key] = sums.get(key, TokenCounts()) + record.tokens
    bounds = [*edges, window.seconds]
    buckets = tuple(TrafficBucket(bounds[k], bounds[k + 1], model, tokens)
                    for (k, model), tokens in sorted(sums.items()))
    return MeteredTraffic(buckets, revenue, theoretical, dict(sorted(by_tier.items())),
                          count_all, outside)


def day_usage_from_records(records: Iterable[UsageRecord], window: Window, schedule: Schedule,
                           usd_per_gpu_hour: Decimal, prices: PriceTable
                           ) -> tuple[DayUsage, MeteredTraffic]:
    """A DayUsage ready for `compute_report`, plus the per-record billing to check it against."""
    metered = aggregate_records(records, window, prices)
    return DayUsage(window, schedule, usd_per_gpu_hour, metered.buckets, prices=prices), metered
