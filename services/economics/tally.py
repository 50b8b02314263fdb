"""Live metering's running totals: usage records folded into token buckets, heartbeats into
device uptime (pure; the ledger service keeps each bucket and uptime as one JetStream KV entry).

Exactly once: records are folded in usage-stream order. A bucket remembers the highest stream
sequence folded into it and skips any record at or below it, so a record delivered again (after
a ledger restart, a lost ack) is never counted twice. That rule is only sound if the folder never
skips a record it has not folded: the ledger reads the stream without gaps (services/ledger).

A bucket holds the tokens of one (model, tenant) over one span: the UTC hour in which the
requests started, cut at the price table's tier switches, so every record in it was priced by
the same tier (a request is priced by the tier in force at its start, as in metering.py).

Uptime: each prefill and decode instance and each expert worker holds `devices` devices from its
process start (the heartbeat's `started_at`) to the last heartbeat heard from it. Another
process under the same instance id (a restart) starts a new interval, so the time it was down
is not billed; the time between a process's last heartbeat and its death is not billed either.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from services.common.states import Role
from services.economics import money
from services.economics.metering import UsageRecord, price_record
from services.economics.money import TokenCounts
from services.economics.prices import PriceTable
from services.economics.window import Window

BILLED_ROLES = frozenset({Role.PREFILL, Role.DECODE, Role.EXPERT_WORKER})  # hold a device
BUCKET_PREFIX, UPTIME_PREFIX = "tok.", "up."


def _digest(*parts: str) -> str:
    """A KV-safe key part for arbitrary text (model names, tenants, instance ids)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def bucket_span(instant: datetime, prices: PriceTable) -> tuple[int, int]:
    """[start, end) in unix seconds of the bucket a request started at `instant` falls in."""
    hour = int(instant.timestamp()) // 3600 * 3600
    window = Window(datetime.fromtimestamp(hour, UTC),
                    datetime.fromtimestamp(hour + 3600, UTC), UTC)
    cuts = [hour, *(hour + t for t in prices.boundary_offsets(window)), hour + 3600]
    second = int(instant.timestamp())
    start = max(c for c in cuts[:-1] if c <= second)
    return start, min(c for c in cuts if c > start)


@dataclass
class TokenBucket:
    start: int  # unix seconds
    end: int
    model: str
    tenant: str
    tier: str = ""
    tokens: TokenCounts = TokenCounts()
    records: int = 0
    revenue_usd: Decimal = Decimal(0)  # at the tier in force (as billed)
    theoretical_revenue_usd: Decimal = Decimal(0)  # at standard prices
    last_seq: int = 0  # the highest usage-stream sequence folded in

    @property
    def key(self) -> str:
        return bucket_key(self.start, self.model, self.tenant)

    def add(self, seq: int, record: UsageRecord, prices: PriceTable) -> bool:
        """Folds the record in; False (and nothing changes) when it was folded in already."""
        if seq <= self.last_seq:
            return False
        tier, charge = price_record(record, prices)
        with money.exact():
            self.revenue_usd += charge
            self.theoretical_revenue_usd += prices.standard(record.model).charge(record.tokens)
        self.tier, self.tokens = tier, self.tokens + record.tokens
        self.records, self.last_seq = self.records + 1, seq
        return True

    def to_doc(self) -> dict[str, Any]:
        t = self.tokens
        return {"start": self.start, "end": self.end, "model": self.model, "tenant": self.tenant,
                "tier": self.tier, "input_cache_hit": t.input_cache_hit,
                "input_cache_miss": t.input_cache_miss, "output": t.output,
                "records": self.records, "revenue_usd": money.plain(self.revenue_usd),
                "theoretical_revenue_usd": money.plain(self.theoretical_revenue_usd),
                "last_seq": self.last_seq}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> TokenBucket:
        return cls(d["start"], d["end"], d["model"], d["tenant"], d["tier"],
                   TokenCounts(d["input_cache_hit"], d["input_cache_miss"], d["output"]),
                   d["records"], Decimal(d["revenue_usd"]), Decimal(d["theoretical_revenue_usd"]),
                   d["last_seq"])


def bucket_key(start: int, model: str, tenant: str) -> str:
    return f"{BUCKET_PREFIX}{start}.{_digest(model, tenant)}"


@dataclass
class DeviceUptime:
    instance_id: str
    role: str
    devices: int = 1
    intervals: list[list[float]] = field(default_factory=list)  # [from, to], unix s, in order

    @property
    def key(self) -> str:
        return uptime_key(self.instance_id)

    def credit(self, started_at: float, until: float) -> bool:
        """The process up since `started_at` was heard at `until`; False when nothing changed."""
        last_to = self.intervals[-1][1] if self.intervals else -math.inf
        start = max(started_at, last_to)
        if until <= start:
            return False
        if self.intervals and started_at <= last_to:  # the same process, still up
            self.intervals[-1][1] = until
        else:  # a new process under this id: the time between the two was not served
            self.intervals.append([start, until])
        return True

    def seconds(self) -> float:
        return sum(b - a for a, b in self.intervals) * self.devices

    def to_doc(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "role": self.role, "devices": self.devices,
                "intervals": self.intervals}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> DeviceUptime:
        return cls(d["instance_id"], d["role"], d["devices"], [list(i) for i in d["intervals"]])


def uptime_key(instance_id: str) -> str:
    return f"{UPTIME_PREFIX}{_digest(instance_id)}"


@dataclass
class Tally:
    """Every bucket and uptime, by KV key, and which changed since `take_dirty()`."""

    prices: PriceTable
    price_as: str = ""  # a model the table does not price is billed at this model's prices
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    uptimes: dict[str, DeviceUptime] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def add_record(self, seq: int, record: UsageRecord) -> bool:
        if record.model not in self.prices.models and self.price_as:
            self.prices = self.prices.with_alias(record.model, self.price_as)
        start, end = bucket_span(record.started_at, self.prices)
        key = bucket_key(start, record.model, record.tenant)
        bucket = self.buckets.setdefault(key, TokenBucket(start, end, record.model, record.tenant))
        if not bucket.add(seq, record, self.prices):
            return False
        self.dirty.add(key)
        return True

    def credit(self, instance_id: str, role: str, started_at: float, heard_at: float,
               now: float, devices: int = 1) -> bool:
        """A heartbeat: `heard_at` (its sent_at) is capped at `now`, so a fast clock is not
        billed ahead of time. Roles that hold no device are not counted."""
        if role not in BILLED_ROLES:
            return False
        until = min(heard_at, now)
        key = uptime_key(instance_id)
        uptime = self.uptimes.setdefault(key, DeviceUptime(instance_id, role, devices))
        if not uptime.credit(min(started_at, until), until):
            return False
        self.dirty.add(key)
        return True

    def take_dirty(self) -> dict[str, dict[str, Any]]:
        """The documents of what changed (the ledger writes them), and forgets they changed."""
        docs = {}
        for key in sorted(self.dirty):
            entry = self.buckets.get(key) or self.uptimes.get(key)
            docs[key] = entry.to_doc()
        self.dirty.clear()
        return docs

    def load(self, key: str, doc: dict[str, Any]) -> None:
        """An entry read back from the store (at start, or after a failed write)."""
        if key.startswith(BUCKET_PREFIX):
            self.buckets[key] = TokenBucket.from_doc(doc)
        elif key.startswith(UPTIME_PREFIX):
            self.uptimes[key] = DeviceUptime.from_doc(doc)


@dataclass(frozen=True)
class Totals:
    """All-time sums of a tally (the ledger's Prometheus gauges)."""

    tokens_by_model: dict[str, TokenCounts]
    records: int
    revenue_usd: Decimal
    theoretical_revenue_usd: Decimal
    device_seconds: float

    def cost_usd(self, usd_per_device_hour: Decimal) -> Decimal:
        with money.exact():
            return Decimal(repr(self.device_seconds)) * usd_per_device_hour / 3600


def totals(tally: Tally) -> Totals:
    by_model: dict[str, TokenCounts] = {}
    revenue, theoretical, records = Decimal(0), Decimal(0), 0
    with money.exact():
        for b in tally.buckets.values():
            by_model[b.model] = by_model.get(b.model, TokenCounts()) + b.tokens
            revenue += b.revenue_usd
            theoretical += b.theoretical_revenue_usd
            records += b.records
    seconds = sum(u.seconds() for u in tally.uptimes.values())
    return Totals(dict(sorted(by_model.items())), records, revenue, theoretical, seconds)

