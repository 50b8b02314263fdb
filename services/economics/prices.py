"""Price tables (USD per million tokens per model, with time-of-day tiers) and their schema.

A tier (DeepSeek's off-peak 16:30-00:30 UTC) replaces the standard prices of the models it lists
while in force, `from` inclusive and `to` exclusive: a request that starts at 16:29:59 UTC pays
standard prices, one at 16:30:00 off-peak. A request is priced by the tier in force at its start.
The one schema is PRICE_TABLE; DeepSeek's published shape is rewritten into it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from services.economics import money
from services.economics.spec import (
    DataError,
    Obj,
    Opt,
    join,
    list_of,
    map_of,
    mapping,
    number,
    one_of,
    text,
)
from services.economics.tokens import TokenCounts
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
        object.__setattr__(self, "start", self.start % SECONDS_PER_DAY)

    def in_force(self, instant: datetime) -> bool:
        second, end = second_of_day(instant.astimezone(self.tz)), self.end % SECONDS_PER_DAY
        if self.start < end:
            return self.start <= second < end
        return second >= self.start or second < end

    def overlaps(self, other: Tier) -> bool:
        """Two spans of a day's circle overlap when one holds the other's start (any day)."""
        def start_of(tier: Tier) -> datetime:
            return datetime(2025, 1, 1, tzinfo=tier.tz) + timedelta(seconds=tier.start)

        return self.in_force(start_of(other)) or other.in_force(start_of(self))

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

    def without_tiers(self) -> PriceTable:
        """Every token at standard prices (DeepSeek's 'theoretical' revenue)."""
        return replace(self, tiers=())


def parse_price_table(doc: Any, path: str = "", *, source: str = "") -> PriceTable:
    """A price file, or a usage file's own table (the block under EMBEDDED_KEY)."""
    if EMBEDDED_KEY in mapping(doc, path or "prices"):
        path = join(path, EMBEDDED_KEY)
        doc, source = mapping(doc[EMBEDDED_KEY], path), source or path
    if "models" not in doc:
        return _from_deepseek(doc, path, source)
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


def _from_deepseek(block: Mapping[str, Any], path: str, source: str) -> PriceTable:
    """DeepSeek's shape (deepseek_day6.json), {MODEL: prices, off_peak_<zone>: {from, to, MODEL:
    prices}}, rewritten into PRICE_TABLE; errors name the field where it is in the block."""
    keys = [str(k) for k in block if str(k).startswith("off_peak")]

    def tier(key: str, value: Any) -> Any:  # off_peak_utc: a tier named off_peak, in UTC
        if not isinstance(value, Mapping):
            return value  # for the schema to say what is wrong with it
        zone_name = key[len("off_peak"):].lstrip("_") or "utc"
        return {"name": "off_peak", "timezone": zone_name.upper(), "from": value.get("from"),
                "to": value.get("to"),
                "models": {m: p for m, p in value.items() if m not in ("from", "to")}}

    doc = {"version": "embedded", "tiers": [tier(k, block[k]) for k in keys],
           "models": {k: v for k, v in block.items() if k not in keys}}
    try:
        return parse_price_table(doc, source=source)
    except DataError as exc:
        where = re.sub(r"^models\.?", "", exc.path)
        where = re.sub(r"^tiers\[(\d+)\](\.models)?", lambda m: keys[int(m[1])], where)
        raise DataError(join(path, where) if where else path or EMBEDDED_KEY, exc.problem) from None
