"""Per-request usage records (what the router publishes) folded into a day of usage.

UsageRecord is the protobuf epserve.v1.UsageRecord as a dataclass with its fields, so records
from JetStream (`from_proto`) and from JSONL files (RECORD: the same names) meet in one
aggregation. Each record is priced by the tier in force at its start; buckets (hourly) are also
cut at every tier switch, so none straddles a price change and they bill the per-record total.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from services.economics import money
from services.economics.prices import PriceTable
from services.economics.schedule import Schedule
from services.economics.spec import DataError, Obj, Opt, count, number, text
from services.economics.tokens import TokenCounts
from services.economics.usage import DayUsage, TrafficBucket
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


def _unix_seconds(value: Any, path: str) -> datetime:
    return datetime.fromtimestamp(float(number()(value, path)), UTC)


_LABEL, _COUNT = Opt(lambda value, _: str(value), ""), Opt(count(), 0)
# A usage record on disk (one JSONL line): the protobuf's names, times in unix seconds.
RECORD = Obj({
    "request_id": _LABEL, "model": text, "started_at": _unix_seconds,
    "finished_at": Opt(_unix_seconds),
    "prompt_tokens": Opt(count()), "prompt_cache_hit_tokens": _COUNT,
    "prompt_cache_miss_tokens": _COUNT, "completion_tokens": _COUNT, "finish_reason": _LABEL,
    "prefill_instance": _LABEL, "decode_instance": _LABEL,
    "time_to_first_token_s": Opt(lambda value, path: float(number()(value, path)), 0.0),
    "usage_id": _LABEL, "migrations": _COUNT,
})


def read_record(doc: Any, path: str) -> UsageRecord:
    values = RECORD(doc, path)
    try:
        return UsageRecord(**values)
    except ValueError as exc:  # prompt_tokens that disagree with the split
        raise DataError(path, str(exc)) from None


@dataclass(frozen=True)
class MeteredTraffic:
    buckets: tuple[TrafficBucket, ...]
    revenue_usd: Decimal  # the sum over records, each at the tier in force at its start
    theoretical_revenue_usd: Decimal  # every record at standard prices
    revenue_by_tier: Mapping[str, Decimal] = field(default_factory=dict)
    records: int = 0
    outside_window: int = 0  # records that started outside the window (not billed here)


def price_record(record: UsageRecord, prices: PriceTable) -> tuple[str, Decimal]:
    """(tier, USD) for one request, by the tier in force when it started."""
    tier, model_prices = prices.price(record.model, record.started_at)
    return tier, model_prices.charge(record.tokens)


def aggregate_records(records: Iterable[UsageRecord], window: Window, prices: PriceTable, *,
                      bucket_seconds: int = 3600) -> MeteredTraffic:
    if bucket_seconds <= 0:
        raise ValueError("bucket_seconds must be positive")
    edges = sorted(set(range(0, window.seconds, bucket_seconds))
                   | set(prices.boundary_offsets(window)))
    sums: dict[tuple[int, str], TokenCounts] = {}
    by_tier: dict[str, Decimal] = {}
    revenue = theoretical = Decimal(0)
    count_all = outside = 0
    with money.exact():
        for record in records:
            count_all += 1
            offset = window.offset_of(record.started_at)
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
                           usd_per_gpu_hour: Decimal, prices: PriceTable, *,
                           bucket_seconds: int = 3600) -> tuple[DayUsage, MeteredTraffic]:
    """A DayUsage ready for `compute_report`, plus the per-record billing to check it against."""
    metered = aggregate_records(records, window, prices, bucket_seconds=bucket_seconds)
    usage = DayUsage(window, schedule, usd_per_gpu_hour, metered.buckets, traffic_timed=True,
                     prices=prices)
    return usage, metered
