"""Reports against hand-computed cases, DeepSeek's published day, and per-request metering."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest

from services.cli.economics import data_path, load_prices
from services.economics import money
from services.economics.metering import UsageRecord, aggregate_records, day_usage_from_records
from services.economics.money import TokenCounts
from services.economics.report import compute_report
from services.economics.reproduce import reference_usage, reproduce
from services.economics.usage import Occupancy, Schedule, parse_usage
from services.economics.window import Window

DAY = 86_400


@pytest.fixture(scope="module")
def prices():
    return load_prices(None)


@pytest.fixture(scope="module")
def day6():
    return reference_usage(json.loads(data_path("deepseek_day6.json").read_text(),
                                      parse_float=Decimal))


def hand_usage(**extra) -> dict:
    """Window 12:00 UTC -> 12:00 UTC. Off-peak (16:30-00:30 UTC) is 4.5 h -> 12.5 h in."""
    doc = {
        "window": {"timezone": "UTC", "from": "2025-03-01T12:00", "to": "2025-03-02T12:00"},
        "hardware": {"gpus_per_node": 8, "usd_per_gpu_hour": "2.50"},
        "node_schedule": [
            {"from": "12:00", "to": "18:00", "nodes": 4, "phase": "prefill"},
            {"from": "18:00", "to": "12:00", "nodes": 8, "phase": "prefill"},
            {"from": "12:00", "to": "12:00", "nodes": 18, "phase": "decode"},
        ],
        "hourly_tokens": [
            # Fully off-peak (17:00 UTC).
            {
                "from": "17:00",
                "model": "deepseek-r1",
                "input_cache_hit": 2_000_000,
                "input_cache_miss": 1_000_000,
                "output_total": 1_000_000,
            },
            # Fully standard (12:00 UTC).
            {
                "from": "12:00",
                "model": "deepseek-v3",
                "input_cache_hit": 3_000_000,
                "input_cache_miss": 0,
                "output_total": 7,
            },
            # Straddles 16:30: the hour has constant nodes, so the split is by time, 50/50.
            {
                "from": "16:00",
                "model": "deepseek-v3",
                "input_cache_hit": 1_000_000,
                "input_cache_miss": 1_000_000,
                "output_total": 1_000_000,
            },
        ],
    }
    doc.update(extra)
    return doc


def test_hand_computed_report(prices):
    report = compute_report(parse_usage(hand_usage()), prices)
    # Cost: prefill 6 h x 4 + 18 h x 8 = 168 node-hours; decode 18 x 24 = 432; x 8 GPUs x $2.50.
    assert report.occupied.node_hours == 600
    assert report.cost_usd == Decimal("12000")
    assert report.phases["prefill"].cost_usd == Decimal("3360")
    assert report.phases["decode"].node_hours == 432
    assert report.occupied.peak_nodes == 26 and report.occupied.avg_nodes == 25
    # r1 off-peak: 2M x .035 + 1M x .135 + 1M x .55 = 0.755
    # v3 standard: 3M x .07 + 7 x 1.10/1M = 0.2100077
    # v3 straddling: standard half 0.5M x (.07 + .27 + 1.10) = 0.72; off-peak half 0.36
    assert report.revenue_by_model == {
        "deepseek-r1": Decimal("0.755"),
        "deepseek-v3": Decimal("0.2100077") + Decimal("1.08"),
    }
    assert report.revenue_usd == Decimal("2.0450077")
    assert report.revenue_by_tier == {
        "off_peak": Decimal("1.115"),
        "standard": Decimal("0.9300077"),
    }
    # Theoretical: r1 at list 2M x .14 + 1M x .55 + 1M x 2.19 = 3.02; v3 0.2100077 + 1.44
    assert report.theoretical_revenue_usd == Decimal("4.6700077")
    exact_margin = Fraction("2.0450077") / 12000 - 1  # non-terminating: 50 digits carried
    assert abs(Fraction(report.margin) - exact_margin) < Fraction(1, 10**45)
    row = next(r for r in report.hours if r.label == "16:00")
    assert row.revenue_usd == Decimal("1.08") and row.occupied.cost_usd == Decimal("440")
    assert any("straddle" in note for note in report.notes)


def test_hours_add_up_to_the_day(prices):
    report = compute_report(parse_usage(hand_usage()), prices)
    assert len(report.hours) == 24
    assert sum((h.occupied.cost_usd for h in report.hours), Decimal(0)) == report.cost_usd
    assert sum((h.revenue_usd for h in report.hours), Decimal(0)) == report.revenue_usd
    assert TokenCounts.sum(h.tokens for h in report.hours) == report.tokens


def test_reproduction_of_deepseek_day(day6):
    result = reproduce(day6, day6.prices)
    report = result.report
    assert report.occupied.node_hours == 5442
    assert report.occupied.avg_nodes == Decimal("226.75")
    assert report.occupied.peak_nodes == 278
    assert report.cost_usd == Decimal("87072")
    assert result.revenue_usd == Decimal("562100")
    assert abs(result.revenue_usd - 562_027) / 562_027 < Decimal("0.0002")
    assert money.percent(result.margin).startswith("545%")
    assert money.percent(result.margin_from_published_revenue).startswith("545%")
    # Off-peak 16:30-00:30 UTC is 00:30-08:30 UTC+8: 1,024 of the 5,442 node-hours.
    assert result.tiered_node_hours == 1024
    variants = {(v.model, v.off_peak_discount): v.revenue_usd for v in result.variants}
    assert variants[("deepseek-v3", False)] == Decimal("280560")
    # Off-peak prices are the same for both models: 342B x .035 + 266B x .135 + 168B x .55.
    full_off_peak = Decimal("140280")
    expected_r1 = (4418 * Decimal(562100) + 1024 * full_off_peak) / 5442
    assert abs(variants[("deepseek-r1", True)] - expected_r1) < Decimal("0.01")
    expected_v3 = (4418 * Decimal(280560) + 1024 * full_off_peak) / 5442
    assert abs(variants[("deepseek-v3", True)] - expected_v3) < Decimal("0.01")


def test_day_totals_are_spread_in_whole_tokens(day6, prices):
    report = compute_report(day6, prices)
    assert report.tokens == day6.tokens
    assert not report.traffic_timed and report.notes
    uniform = compute_report(day6, prices, spread="uniform")
    # Uniformly, the 8 off-peak hours carry a third of the tokens.
    assert uniform.tokens_by_tier["off_peak"].output == 56_000_000_000


def record(started_at, model, hit, miss, out) -> UsageRecord:
    return UsageRecord(
        started_at=started_at,
        model=model,
        prompt_cache_hit_tokens=hit,
        prompt_cache_miss_tokens=miss,
        completion_tokens=out,
    )


def _records(window: Window) -> list[UsageRecord]:
    def rec(hh, mm, ss, model="deepseek-r1", hit=1000, miss=2000, out=3000, us=0):
        started = datetime(2025, 3, 1, hh, mm, ss, us, tzinfo=UTC)
        if started < window.start:
            started += timedelta(days=1)
        return record(started, model, hit, miss, out)

    return [
        rec(16, 29, 59, us=500_000),  # standard: the tier starts at 16:30:00
        rec(16, 30, 0),  # off-peak
        rec(23, 59, 59, model="deepseek-v3"),  # off-peak, across midnight
        rec(0, 0, 0, model="deepseek-v3"),  # off-peak
        rec(0, 29, 59),  # off-peak
        rec(0, 30, 0),  # standard again
        rec(13, 0, 0, hit=0, miss=0, out=1),
    ]


def test_metering_prices_each_record_by_its_start_and_report_agrees(prices):
    window = Window(datetime(2025, 3, 1, 12, tzinfo=UTC), datetime(2025, 3, 2, 12, tzinfo=UTC), UTC)
    records = _records(window)
    schedule = Schedule((Occupancy(0, DAY, 8),), 8)
    usage, metered = day_usage_from_records(records, window, schedule, Decimal(2), prices)
    r1 = 1000 * Decimal("0.14") + 2000 * Decimal("0.55") + 3000 * Decimal("2.19")
    r1_off = 1000 * Decimal("0.035") + 2000 * Decimal("0.135") + 3000 * Decimal("0.55")
    v3_off = r1_off  # the same off-peak prices
    expected = (2 * r1 + 2 * r1_off + 2 * v3_off + Decimal("2.19")) / 1_000_000
    assert metered.revenue_usd == expected
    assert metered.revenue_by_tier["off_peak"] == (2 * r1_off + 2 * v3_off) / 1_000_000
    report = compute_report(usage, prices)
    assert report.revenue_usd == metered.revenue_usd
    assert report.theoretical_revenue_usd == metered.theoretical_revenue_usd
    assert report.cost_usd == 8 * 24 * 2  # one node of 8 GPUs all day at $2
    # No bucket straddles 16:30 UTC: it is a bucket edge.
    assert all(not (b.start < 4.5 * 3600 < b.end) for b in usage.traffic)


def test_metering_skips_records_outside_the_window(prices):
    window = Window(datetime(2025, 3, 1, 12, tzinfo=UTC), datetime(2025, 3, 2, 12, tzinfo=UTC), UTC)
    late = record(datetime(2025, 3, 2, 12, 0, tzinfo=UTC), "deepseek-r1", 1, 1, 1)
    metered = aggregate_records([late], window, prices)
    assert (metered.records, metered.outside_window, metered.buckets) == (1, 1, ())


def test_usage_record_validation():
    with pytest.raises(ValueError):
        record(datetime(2025, 3, 1), "m", 1, 1, 1)
    with pytest.raises(ValueError):
        record(datetime(2025, 3, 1, tzinfo=UTC), "m", -1, 1, 1)


def test_gaps_cost_nothing_and_zero_cost_has_no_margin(prices):
    doc = hand_usage(node_schedule=[{"from": "12:00", "to": "13:00", "nodes": 0}])
    report = compute_report(parse_usage(doc), prices)
    assert report.cost_usd == 0 and report.margin is None
    assert money.percent(report.margin).startswith("n/a")
