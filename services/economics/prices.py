"""Price tables: USD per million tokens per model, with time-of-day tiers (pure, no I/O).

A tier (DeepSeek's off-peak window 16:30-00:30 UTC) replaces the standard prices of the models it
lists while it is in force; `from` is inclusive and `to` exclusive, so a request that starts at
16:29:59 UTC pays standard prices and one at 16:30:00 pays off-peak. A request is priced by the
tier in force when it started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from decimal import Decimal
from types import MappingProxyType

from services.economics import money
from services.economics.clock import SECONDS_PER_DAY, Window
from services.economics.tokens import TokenCounts

PRICE_FIELDS = ("input_cache_hit", "input_cache_miss", "output")
STANDARD_TIER = "standard"


class UnknownModel(ValueError):
    """A model with no price in the table."""


@dataclass(frozen=True)
class ModelPrices:
    """USD per million tokens."""

    input_cache_hit: Decimal
    input_cache_miss: Decimal
    output: Decimal

    def __post_init__(self) -> None:
        for name in PRICE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"{name} must be a finite Decimal >= 0, got {value!r}")

    def charge(self, tokens: TokenCounts) -> Decimal:
        with money.exact():
            return (
                money.charge(tokens.input_cache_hit, self.input_cache_hit)
                + money.charge(tokens.input_cache_miss, self.input_cache_miss)
                + money.charge(tokens.output, self.output)
            )


@dataclass(frozen=True)
class Tier:
    """Prices in force every day from `start` (inclusive) to `end` (exclusive), clock seconds
    in `tz`; `end < start` means the tier crosses midnight."""

    name: str
    start: int
    end: int
    tz: timezone
    models: Mapping[str, ModelPrices]

    def __post_init__(self) -> None:
        if not self.name or self.name == STANDARD_TIER:
            raise ValueError(f"tier name must be non-empty and not {STANDARD_TIER!r}")
        if not 0 <= self.start < SECONDS_PER_DAY or not 0 <= self.end <= SECONDS_PER_DAY:
            raise ValueError("tier from/to must be clock times within a day")
        if self.start == self.end % SECONDS_PER_DAY:
            raise ValueError("tier from and to must differ")
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    def in_force(self, instant: datetime) -> bool:
        local = instant.astimezone(self.tz)
        second = local.hour * 3600 + local.minute * 60 + local.second
        end = self.end % SECONDS_PER_DAY
        if self.start < end:
            return self.start <= second < end
        return second >= self.start or second < end

    def utc_ranges(self) -> list[tuple[int, int]]:
        """The tier as [a, b) ranges of UTC seconds-of-day (split at midnight)."""
        offset = int(self.tz.utcoffset(None).total_seconds())
        start = (self.start - offset) % SECONDS_PER_DAY
        length = (self.end - self.start) % SECONDS_PER_DAY
        if start + length <= SECONDS_PER_DAY:
            return [(start, start + length)]
        return [(start, SECONDS_PER_DAY), (0, start + length - SECONDS_PER_DAY)]

    def boundary_offsets(self, window: Window) -> list[int]:
        return window.daily_offsets(self.start, self.tz) + window.daily_offsets(self.end, self.tz)


@dataclass(frozen=True)
class PriceTable:
    models: Mapping[str, ModelPrices]
    tiers: tuple[Tier, ...] = ()
    version: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a price table needs at least one model")
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))
        object.__setattr__(self, "tiers", tuple(self.tiers))
        for tier in self.tiers:
            unknown = sorted(set(tier.models) - set(self.models))
            if unknown:
                raise ValueError(
                    f"tier {tier.name!r} prices models with no standard price: {unknown}"
                )
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique: {names}")
        for i, first in enumerate(self.tiers):
            for second in self.tiers[i + 1 :]:
                if _overlap(first.utc_ranges(), second.utc_ranges()):
                    raise ValueError(f"tiers {first.name!r} and {second.name!r} overlap")

    def tier_at(self, instant: datetime) -> Tier | None:
        if instant.tzinfo is None:
            raise ValueError("instants must be timezone-aware")
        for tier in self.tiers:
            if tier.in_force(instant):
                return tier
        return None

    def standard(self, model: str) -> ModelPrices:
        try:
            return self.models[model]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise UnknownModel(
                f"no price for model {model!r} (the table prices: {known})"
            ) from None

    def price(self, model: str, started_at: datetime) -> tuple[str, ModelPrices]:
        """(tier name, prices) for a request of `model` that started at `started_at`."""
        standard = self.standard(model)
        tier = self.tier_at(started_at)
        if tier is None or model not in tier.models:
            return STANDARD_TIER, standard
        return tier.name, tier.models[model]

    def boundary_offsets(self, window: Window) -> list[int]:
        return sorted({offset for tier in self.tiers for offset in tier.boundary_offsets(window)})

    def without_tiers(self) -> PriceTable:
        """Every token at standard prices (DeepSeek's 'theoretical' revenue)."""
        return replace(self, tiers=())


def _overlap(first: list[tuple[int, int]], second: list[tuple[int, int]]) -> bool:
    return any(a < d and c < b for a, b in first for c, d in second)
