"""A day of usage: the window, GPU occupancy, GPU price and the traffic to bill (pure data).

Built by `usage_parse.parse_usage` from a usage file (the deepseek_day6.json schema, extended),
or by `metering.aggregate_records` from per-request usage records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

from services.economics.clock import Window
from services.economics.prices import PriceTable
from services.economics.schedule import Schedule
from services.economics.tokens import TokenCounts


@dataclass(frozen=True)
class TrafficBucket:
    """Tokens of one model served in [start, end) (seconds since the window start)."""

    start: int
    end: int
    model: str
    tokens: TokenCounts

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"bucket needs 0 <= start < end, got [{self.start}, {self.end})")
        if not self.model:
            raise ValueError("bucket model must be non-empty")


@dataclass(frozen=True)
class Published:
    """Figures a source published for the day, shown beside ours; any may be missing."""

    cost_usd: Decimal | None = None
    revenue_usd: Decimal | None = None
    margin: Decimal | None = None
    peak_nodes: Decimal | None = None
    avg_nodes: Decimal | None = None
    note: str = ""


@dataclass(frozen=True)
class NodeThroughput:
    """Per-node throughput: prefill input tok/s (cache hits included), decode output tok/s."""

    prefill_input_tok_per_s: Decimal
    decode_output_tok_per_s: Decimal

    def __post_init__(self) -> None:
        if self.prefill_input_tok_per_s <= 0 or self.decode_output_tok_per_s <= 0:
            raise ValueError("per-node throughputs must be > 0")


@dataclass(frozen=True)
class Deployment:
    """Nodes are added and removed in whole units (DeepSeek: prefill 4 nodes, decode 18)."""

    prefill_unit_nodes: int
    decode_unit_nodes: int

    def __post_init__(self) -> None:
        if self.prefill_unit_nodes <= 0 or self.decode_unit_nodes <= 0:
            raise ValueError("deployment unit sizes must be positive")


@dataclass(frozen=True)
class DayUsage:
    window: Window
    schedule: Schedule
    usd_per_gpu_hour: Decimal
    traffic: tuple[TrafficBucket, ...]
    # False when the traffic is day totals only (no times), so it must be spread over the day.
    traffic_timed: bool
    prices: PriceTable | None = None  # the usage file's own price block, if it has one
    published: Published | None = None
    throughput: NodeThroughput | None = None
    deployment: Deployment | None = None
    # Where each model name came from in the file, so a missing price names the field.
    model_fields: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "traffic", tuple(self.traffic))
        object.__setattr__(self, "model_fields", MappingProxyType(dict(self.model_fields)))
        if self.usd_per_gpu_hour < 0:
            raise ValueError("usd_per_gpu_hour must be >= 0")
        for bucket in self.traffic:
            if bucket.end > self.window.seconds:
                raise ValueError("a traffic bucket runs past the end of the window")
        for interval in self.schedule.intervals:
            if interval.end > self.window.seconds:
                raise ValueError("an occupancy interval runs past the end of the window")

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts.sum(bucket.tokens for bucket in self.traffic)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({bucket.model for bucket in self.traffic}))

    def tokens_of(self, model: str) -> TokenCounts:
        return TokenCounts.sum(b.tokens for b in self.traffic if b.model == model)
