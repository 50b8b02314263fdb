"""Parse a price-table document (canonical, or the block embedded in a usage file).

Canonical (data/prices.yaml):
    version, source, currency: USD, unit: per_million_tokens,
    models: {MODEL: {input_cache_hit, input_cache_miss, output}},
    tiers: [{name, timezone, from, to, models: {MODEL: {...}}}]
Embedded (deepseek_day6.json `pricing_usd_per_million_tokens`):
    {MODEL: {...}, off_peak_utc: {from, to, MODEL: {...}}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.economics.clock import parse_clock, parse_timezone
from services.economics.fields import DataError, decimal, join, mapping, required, sequence, text
from services.economics.prices import PRICE_FIELDS, ModelPrices, PriceTable, Tier

EMBEDDED_KEY = "pricing_usd_per_million_tokens"
_TIER_PREFIX = "off_peak"


def parse_price_table(doc: Any, path: str = "", *, source: str = "") -> PriceTable:
    root = mapping(doc, path or "prices")
    if EMBEDDED_KEY in root:
        block_path = join(path, EMBEDDED_KEY)
        return parse_embedded(root[EMBEDDED_KEY], block_path, source=source or block_path)
    if "models" not in root:
        return parse_embedded(root, path, source=source)
    return _parse_canonical(root, path, source)


def parse_embedded(doc: Any, path: str, *, source: str = "") -> PriceTable:
    block = mapping(doc, path or EMBEDDED_KEY)
    models: dict[str, ModelPrices] = {}
    tiers: list[Tier] = []
    for key, value in block.items():
        key_path = join(path, key)
        if str(key).startswith(_TIER_PREFIX):
            tiers.append(_parse_embedded_tier(str(key), value, key_path))
        else:
            models[str(key)] = parse_model_prices(value, key_path)
    if not models:
        raise DataError(path or EMBEDDED_KEY, "must price at least one model")
    return _build(models, tiers, "embedded", source, path)


def parse_model_prices(doc: Any, path: str) -> ModelPrices:
    block = mapping(doc, path)
    for key in block:
        if key not in PRICE_FIELDS:
            raise DataError(
                join(path, key), f"unknown price field; expected {', '.join(PRICE_FIELDS)}"
            )
    values = {name: decimal(required(block, name, path), join(path, name)) for name in PRICE_FIELDS}
    return ModelPrices(**values)


def _parse_canonical(root: Mapping[str, Any], path: str, source: str) -> PriceTable:
    version = str(root.get("version", "")).strip()
    if "currency" in root and root["currency"] != "USD":
        raise DataError(join(path, "currency"), f"only USD is supported, got {root['currency']!r}")
    if "unit" in root and root["unit"] != "per_million_tokens":
        raise DataError(join(path, "unit"), f"must be 'per_million_tokens', got {root['unit']!r}")
    models_path = join(path, "models")
    models_doc = mapping(root["models"], models_path)
    if not models_doc:
        raise DataError(models_path, "must price at least one model")
    models = {
        str(name): parse_model_prices(value, join(models_path, str(name)))
        for name, value in models_doc.items()
    }
    tiers_path = join(path, "tiers")
    tiers = [
        _parse_tier(entry, join(tiers_path, i))
        for i, entry in enumerate(sequence(root.get("tiers") or [], tiers_path))
    ]
    source = source or str(root.get("source", "")).strip()
    return _build(models, tiers, version, source, path)


def _parse_tier(doc: Any, path: str) -> Tier:
    block = mapping(doc, path)
    name = text(required(block, "name", path), join(path, "name"))
    tz = parse_timezone(block.get("timezone", "UTC"), join(path, "timezone"))
    models_path = join(path, "models")
    models_doc = mapping(required(block, "models", path), models_path)
    models = {
        str(model): parse_model_prices(value, join(models_path, str(model)))
        for model, value in models_doc.items()
    }
    return _make_tier(name, block, tz, models, path)


def _parse_embedded_tier(key: str, doc: Any, path: str) -> Tier:
    block = mapping(doc, path)
    zone = key[len(_TIER_PREFIX) :].lstrip("_") or "utc"
    tz = parse_timezone(zone.upper(), path)
    models = {
        str(model): parse_model_prices(value, join(path, str(model)))
        for model, value in block.items()
        if model not in ("from", "to", "timezone")
    }
    # "off_peak_utc" names the tier "off_peak", as the canonical table does.
    return _make_tier(_TIER_PREFIX, block, tz, models, path)


def _make_tier(name: str, block: Mapping[str, Any], tz, models, path: str) -> Tier:
    start = parse_clock(required(block, "from", path), join(path, "from"))
    end = parse_clock(required(block, "to", path), join(path, "to"))
    try:
        return Tier(name=name, start=start % 86_400, end=end, tz=tz, models=models)
    except ValueError as exc:
        raise DataError(path, str(exc)) from None


def _build(models, tiers, version: str, source: str, path: str) -> PriceTable:
    try:
        return PriceTable(models=models, tiers=tuple(tiers), version=version, source=source)
    except ValueError as exc:
        raise DataError(join(path, "tiers") if tiers else path or "prices", str(exc)) from None
