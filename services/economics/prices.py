"""Price tables (USD per million tokens per model, with time-of-day tiers) and their schema.

A tier (DeepSeek's off-peak 16:30-00:30 UTC) replaces the standard prices of the models it lists
while in force, `from` inclusive and `to` exclusive: a request that starts at 16:29:59 UTC pays
standard prices, one at 16:30:00 off-peak. A request is priced by the tier in force at its start.
The one schema is PRICE_TABLE (DeepSeek's published shape is read only by the reproduction).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from services.economics import money
from services.economics.money import TokenCounts
from services.economics.spec import DataError, Obj, Opt, join, list_of, map_of, number, one_of, text
from services.economics.window import SECONDS_PER_DAY, Window, clock, second_of_day, zone

PRICE_FIELDS = ("input_cache_hit", "input_cache_miss", "output")
STANDARD_TIER = "standard"
EMBEDDED_KEY = "pricing_usd_per_million_tokens"  # a usage file's own price table

MODEL_PRICES = Obj({name: number() for name in PRICE_FIELDS},
                   unknown=f"unknown price field; expected {', '.join(PRICE_FIELDS)}")
TIER = Obj({"name": text, "timezone": Opt(zone, UTC), "from": clock, "to": clock,
            "models": map_of(MODEL_PRICES)})
PRICE_TABLE = Obj({
    "version": Opt(lambda v, _: str(v).strip(), ""), "source": Opt(lambda v, _: str(v).strip(), ""),
    "currency": Opt(one_of("USD")), "unit": Opt(one_of("per_million_tokens")),
    "models": map_of(MODEL_PRICES, "must price at least one model"),
    "tiers": Opt(list_of(TIER), []),
})


class UnknownModel(ValueError):
    """A model with no price in the table."""


@dataclass(frozen=True)
class ModelPrices:
    """USD per million tokens."""

    input_cache_hit: Decimal
    input_cache_miss: Decimal
    output: Decimal

    def charge(self, tokens: TokenCounts) -> Decimal:
        with money.exact():
            return sum(money.charge(getattr(tokens, name), getattr(self, name))
                       for name in PRICE_FIELDS)


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
        if self.start % SECONDS_PER_DAY == self.end % SECONDS_PER_DAY:
            raise ValueError("tier from and to must differ")
        object.__setattr__(self, "start", self.start % SECONDS_PER_DAY)  # "24:00" is 00:00
        object.__setattr__(self, "end", self.end % SECONDS_PER_DAY)

    def in_force(self, instant: datetime) -> bool:
        second = second_of_day(instant.astimezone(self.tz))
        if self.start < self.end:
            return self.start <= second < self.end
        return not self.end <= second < self.start  # across midnight

    def overlaps(self, other: Tier) -> bool:
        """Two spans of a day's circle overlap when one holds the other's start (any day)."""
        mine, theirs = (datetime(2025, 1, 1, tzinfo=t.tz) + timedelta(seconds=t.start)
                        for t in (self, other))
        return self.in_force(theirs) or other.in_force(mine)

    def boundary_offsets(self, window: Window) -> list[int]:
        return window.daily_offsets(self.start, self.tz) + window.daily_offsets(self.end, self.tz)


@dataclass(frozen=True)
class PriceTable:
    models: Mapping[str, ModelPrices]
    tiers: tuple[Tier, ...] = ()
    version: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for tier in self.tiers:
            if unknown := sorted(set(tier.models) - set(self.models)):
                raise ValueError(
                    f"tier {tier.name!r} prices models with no standard price: {unknown}")
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique: {names}")
        for i, one in enumerate(self.tiers):
            for other in self.tiers[i + 1:]:
                if one.overlaps(other):
                    raise ValueError(f"tiers {one.name!r} and {other.name!r} overlap")

    def tier_at(self, instant: datetime) -> Tier | None:
        if instant.tzinfo is None:
            raise ValueError("instants must be timezone-aware")
        return next((tier for tier in self.tiers if tier.in_force(instant)), None)

    def standard(self, model: str) -> ModelPrices:
        if model not in self.models:
            known = ", ".join(sorted(self.models))
            raise UnknownModel(f"no price for model {model!r} (the table prices: {known})")
        return self.models[model]

    def price(self, model: str, started_at: datetime) -> tuple[str, ModelPrices]:
        """(tier name, prices) for a request of `model` that started at `started_at`."""
        standard, tier = self.standard(model), self.tier_at(started_at)
        if tier is None or model not in tier.models:
            return STANDARD_TIER, standard
        return tier.name, tier.models[model]

    def boundary_offsets(self, window: Window) -> list[int]:
        return sorted({t for tier in self.tiers for t in tier.boundary_offsets(window)})

    def with_alias(self, model: str, as_model: str) -> PriceTable:
        """`model` billed exactly as `as_model`, in every tier (a served checkpoint's name
        priced as the public model it stands for)."""
        if model in self.models:
            return self
        standard = self.standard(as_model)
        tiers = tuple(replace(tier, models={**tier.models, model: tier.models[as_model]})
                      if as_model in tier.models else tier for tier in self.tiers)
        return replace(self, models={**self.models, model: standard}, tiers=tiers)

    def without_tiers(self) -> PriceTable:
        """Every token at standard prices (DeepSeek's 'theoretical' revenue)."""
        return replace(self, tiers=())


def parse_price_table(doc: Any, path: str = "", *, source: str = "") -> PriceTable:
    """A price file, or a usage file's own table (the block under EMBEDDED_KEY, at `path`)."""
    table = PRICE_TABLE(doc, path)
    models = {name: ModelPrices(**prices) for name, prices in table["models"].items()}
    tiers = []
    for i, tier in enumerate(table["tiers"]):
        try:
            tiers.append(Tier(tier["name"], tier["from"], tier["to"], tier["timezone"],
                              {m: ModelPrices(**p) for m, p in tier["models"].items()}))
        except ValueError as exc:
            raise DataError(join(join(path, "tiers"), i), str(exc)) from None
    try:
        return PriceTable(models, tuple(tiers), table["version"], source or table["source"])
    except ValueError as exc:
        raise DataError(join(path, "tiers"), str(exc)) from None
