"""Price tables: exact decimals, time-of-day tiers and their boundaries, malformed tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.cli.economics import data_path, load_document, load_prices
from services.economics import money
from services.economics.money import TokenCounts
from services.economics.prices import STANDARD_TIER, ModelPrices, UnknownModel, parse_price_table
from services.economics.reproduce import reference_usage
from services.economics.spec import DataError

UTC8 = timezone(timedelta(hours=8))


@pytest.fixture(scope="module")
def table():
    return load_prices(None)


def at(hh: int, mm: int, ss: int = 0, tz=UTC, day: int = 27, us: int = 0) -> datetime:
    return datetime(2025, 2, day, hh, mm, ss, us, tzinfo=tz)


def test_default_table_is_versioned_and_exact(table):
    assert table.version == "2025-02-26"
    r1 = table.standard("deepseek-r1")
    assert r1 == ModelPrices(Decimal("0.14"), Decimal("0.55"), Decimal("2.19"))
    assert table.standard("deepseek-v3").output == Decimal("1.10")
    assert [t.name for t in table.tiers] == ["off_peak"]


def test_default_table_matches_the_reference_file(table):
    # DeepSeek published its prices in its own shape; the reproduction's adapter reads them.
    embedded = reference_usage(load_document(data_path("deepseek_day6.json"), "usage")).prices
    assert dict(embedded.models) == dict(table.models)
    assert dict(embedded.tiers[0].models) == dict(table.tiers[0].models)
    assert (embedded.tiers[0].start, embedded.tiers[0].end) == (16 * 3600 + 1800, 1800)


@pytest.mark.parametrize(
    ("instant", "tier"),
    [
        (at(16, 29, 59), STANDARD_TIER),
        (at(16, 29, 59, us=999_999), STANDARD_TIER),
        (at(16, 30, 0), "off_peak"),
        (at(23, 59, 59), "off_peak"),
        (at(0, 0, 0, day=28), "off_peak"),
        (at(0, 29, 59, day=28), "off_peak"),
        (at(0, 30, 0, day=28), STANDARD_TIER),
        (at(12, 0, 0), STANDARD_TIER),
        # The same instants seen from UTC+8: 00:29:59 UTC+8 is 16:29:59 UTC.
        (at(0, 29, 59, tz=UTC8, day=28), STANDARD_TIER),
        (at(0, 30, 0, tz=UTC8, day=28), "off_peak"),
        (at(8, 29, 59, tz=UTC8, day=28), "off_peak"),
        (at(8, 30, 0, tz=UTC8, day=28), STANDARD_TIER),
    ],
)
def test_request_priced_by_tier_in_force_at_its_start(table, instant, tier):
    name, prices = table.price("deepseek-r1", instant)
    assert name == tier
    expected = Decimal("0.55") if tier == "off_peak" else Decimal("2.19")
    assert prices.output == expected


def test_naive_instants_are_refused(table):
    with pytest.raises(ValueError, match="timezone-aware"):
        table.tier_at(datetime(2025, 2, 27, 16, 30))


def test_unknown_model_names_the_model(table):
    with pytest.raises(UnknownModel, match="'deepseek-r2'"):
        table.price("deepseek-r2", at(12, 0))


def test_charges_are_exact_decimals(table):
    r1 = table.standard("deepseek-r1")
    tokens = TokenCounts(342_000_000_000, 266_000_000_000, 168_000_000_000)
    assert r1.charge(tokens) == Decimal("562100")
    # A float sum drifts (0.1 + 0.2 != 0.3); exact decimals do not.
    v3 = table.standard("deepseek-v3")
    one_each = sum((v3.charge(TokenCounts(1, 1, 1)) for _ in range(3)), Decimal(0))
    assert one_each == Decimal("0.00000432")
    assert money.charge(1, Decimal("0.1")) + money.charge(2, Decimal("0.1")) == Decimal("3E-7")


def test_tier_only_reprices_the_models_it_lists():
    doc = {
        "models": {
            "a": {"input_cache_hit": 1, "input_cache_miss": 2, "output": 3},
            "b": {"input_cache_hit": 1, "input_cache_miss": 2, "output": 3},
        },
        "tiers": [
            {
                "name": "night",
                "timezone": "UTC+8",
                "from": "22:00",
                "to": "06:00",
                "models": {"a": {"input_cache_hit": 0, "input_cache_miss": 1, "output": 1}},
            }
        ],
    }
    table = parse_price_table(doc)
    night = at(23, 0, tz=UTC8)
    assert table.price("a", night)[0] == "night"
    assert table.price("b", night) == (STANDARD_TIER, table.standard("b"))
    assert table.price("a", at(6, 0, tz=UTC8))[0] == STANDARD_TIER


def _table(**overrides):
    doc = {
        "version": "t",
        "models": {"m": {"input_cache_hit": "0.1", "input_cache_miss": "0.2", "output": "0.3"}},
        "tiers": [
            {
                "name": "off",
                "from": "16:30",
                "to": "00:30",
                "models": {"m": {"input_cache_hit": 0, "input_cache_miss": 0, "output": 0}},
            }
        ],
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"models": {"m": {"input_cache_hit": 1, "input_cache_miss": 1}}}, "models.m.output"),
        (
            {"models": {"m": {"input_cache_hit": -1, "input_cache_miss": 1, "output": 1}}},
            "models.m.input_cache_hit",
        ),
        (
            {"models": {"m": {"input_cache_hit": "x", "input_cache_miss": 1, "output": 1}}},
            "models.m.input_cache_hit",
        ),
        (
            {
                "models": {
                    "m": {"input_cache_hit": 1, "input_cache_miss": 1, "output": 1, "typo": 1}
                }
            },
            "models.m.typo",
        ),
        ({"models": {}}, "models"),
        ({"currency": "EUR"}, "currency"),
        ({"tiers": [{"name": "x", "from": "25:00", "to": "01:00", "models": {}}]}, "tiers[0].from"),
        ({"tiers": [{"name": "x", "from": "01:00", "to": "01:00", "models": {}}]}, "tiers[0]"),
        ({"tiers": [{"from": "01:00", "to": "02:00", "models": {}}]}, "tiers[0].name"),
        ({"tiers": [{"name": "x", "from": "01:00", "to": "02:00"}]}, "tiers[0].models"),
        (
            {
                "tiers": [
                    {
                        "name": "x",
                        "from": "1:00",
                        "to": "2:00",
                        "timezone": "Mars/Base",
                        "models": {},
                    }
                ]
            },
            "tiers[0].timezone",
        ),
    ],
)
def test_malformed_price_tables_name_the_field(change, path):
    with pytest.raises(DataError) as err:
        parse_price_table(_table(**change))
    assert err.value.path == path
    assert str(err.value).startswith(path + ":")


def test_overlapping_tiers_are_rejected():
    tiers = [
        {"name": "a", "from": "16:30", "to": "00:30", "models": {}},
        # 08:00 UTC+8 = 00:00 UTC, inside tier a.
        {"name": "b", "timezone": "UTC+8", "from": "08:00", "to": "09:00", "models": {}},
    ]
    with pytest.raises(DataError, match="overlap") as err:
        parse_price_table(_table(tiers=tiers))
    assert err.value.path == "tiers"


def test_tier_pricing_an_unknown_model_is_rejected():
    tiers = [
        {
            "name": "a",
            "from": "16:30",
            "to": "00:30",
            "models": {"zz": {"input_cache_hit": 0, "input_cache_miss": 0, "output": 0}},
        }
    ]
    with pytest.raises(DataError, match="'zz'"):
        parse_price_table(_table(tiers=tiers))


def test_without_tiers_prices_every_token_at_standard(table):
    flat = table.without_tiers()
    assert flat.price("deepseek-r1", at(17, 0)) == (STANDARD_TIER, table.standard("deepseek-r1"))
