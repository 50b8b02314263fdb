"""Live metering's pure core: records folded exactly once into tier-pure hourly buckets, device
uptime from heartbeats, and both turned into a day the offline report computes."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.cli.economics import load_prices
from services.economics.live import live_usage, live_window, occupancy_schedule
from services.economics.metering import UsageRecord
from services.economics.report import compute_report
from services.economics.tally import DeviceUptime, Tally, TokenBucket, bucket_span, totals
from services.economics.usage import Occupancy

PRICES = load_prices(None)  # deepseek-v3 0.07/0.27/1.10, off-peak 16:30-00:30 UTC at half
DAY = datetime(2025, 3, 1, tzinfo=UTC).timestamp()


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2025, 3, 1, hour, minute, second, tzinfo=UTC)


def record(started: datetime, hit=0, miss=100, out=10, model="deepseek-v3", tenant=""):
    return UsageRecord(model=model, started_at=started, prompt_cache_hit_tokens=hit,
                       prompt_cache_miss_tokens=miss, completion_tokens=out, tenant=tenant)


def usd(hit, miss, out, prices=("0.07", "0.27", "1.10")) -> Decimal:
    """Independent arithmetic: tokens times USD per million."""
    return sum((Decimal(n) * Decimal(p) for n, p in zip((hit, miss, out), prices, strict=True)),
               Decimal(0)) / 1_000_000


def test_buckets_are_hours_cut_at_tier_switches():
    assert bucket_span(at(15, 59, 59), PRICES) == (DAY + 15 * 3600, DAY + 16 * 3600)
    assert bucket_span(at(16, 10), PRICES) == (DAY + 16 * 3600, DAY + 16.5 * 3600)
    assert bucket_span(at(16, 30), PRICES) == (DAY + 16.5 * 3600, DAY + 17 * 3600)
    assert bucket_span(at(0, 45), PRICES) == (DAY + 1800, DAY + 3600)


def test_each_record_is_folded_once_and_priced_by_its_tier():
    tally = Tally(PRICES)
    assert tally.add_record(1, record(at(10), hit=64, miss=36, out=20))
    assert tally.add_record(2, record(at(10, 30), miss=50, out=5))
    assert not tally.add_record(2, record(at(10, 30), miss=50, out=5))  # redelivered
    assert not tally.add_record(1, record(at(10), hit=64, miss=36, out=20))
    assert tally.add_record(3, record(at(17), miss=1000, out=100))  # off-peak
    (standard, off_peak) = sorted(tally.buckets.values(), key=lambda b: b.start)
    assert (standard.records, standard.tier, standard.tokens.input_cache_miss) == (2, "standard", 86)
    assert standard.revenue_usd == usd(64, 86, 25)
    assert off_peak.tier == "off_peak"
    assert off_peak.revenue_usd == usd(0, 1000, 100, ("0.035", "0.135", "0.55"))
    assert off_peak.theoretical_revenue_usd == usd(0, 1000, 100)
    t = totals(tally)
    assert t.records == 3 and t.revenue_usd == standard.revenue_usd + off_peak.revenue_usd


def test_tenants_and_models_get_their_own_buckets():
    tally = Tally(PRICES)
    tally.add_record(1, record(at(9), tenant="a"))
    tally.add_record(2, record(at(9), tenant="b"))
    tally.add_record(3, record(at(9), model="deepseek-r1"))
    assert len(tally.buckets) == 3


def test_an_unpriced_model_is_billed_as_the_fallback_in_every_tier():
    with pytest.raises(ValueError, match="no price for model 'v3-mini'"):
        Tally(PRICES).add_record(1, record(at(9), model="v3-mini"))
    tally = Tally(PRICES, price_as="deepseek-v3")
    tally.add_record(1, record(at(9), model="v3-mini"))
    tally.add_record(2, record(at(20), model="v3-mini"))
    revenues = sorted(b.revenue_usd for b in tally.buckets.values())
    assert revenues == sorted([usd(0, 100, 10), usd(0, 100, 10, ("0.035", "0.135", "0.55"))])


def test_dirty_entries_round_trip_through_their_documents():
    tally = Tally(PRICES)
    tally.add_record(7, record(at(9), hit=1, miss=2, out=3, tenant="t"))
    tally.credit("decode-0", "decode", started_at=DAY, heard_at=DAY + 10.5, now=DAY + 11)
    docs = tally.take_dirty()
    assert len(docs) == 2 and not tally.dirty
    again = Tally(PRICES)
    for key, doc in docs.items():
        again.load(key, doc)
    assert again.buckets == tally.buckets and again.uptimes == tally.uptimes
    (bucket,) = again.buckets.values()
    assert bucket.last_seq == 7 and not bucket.add(7, record(at(9)), PRICES)


def test_uptime_extends_while_the_process_lives_and_restarts_leave_a_gap():
    u = DeviceUptime("expert-worker-0", "expert-worker")
    assert u.credit(100.0, 101.0) and u.credit(100.0, 105.0)
    assert not u.credit(100.0, 104.0)  # an old heartbeat arriving late
    assert u.credit(200.0, 230.0)  # restarted at 200: 105..200 was not served
    assert u.intervals == [[100.0, 105.0], [200.0, 230.0]] and u.seconds() == 35.0


def test_only_device_holders_are_billed_and_never_ahead_of_the_clock():
    tally = Tally(PRICES)
    assert not tally.credit("router-0", "router", 0.0, 10.0, now=10.0)
    assert not tally.credit("scheduler", "scheduler", 0.0, 10.0, now=10.0)
    assert tally.credit("prefill-0", "prefill", 0.0, 50.0, now=20.0)  # its clock runs ahead
    assert totals(tally).device_seconds == 20.0


def test_occupancy_is_the_sum_of_intervals_as_steps():
    ups = [DeviceUptime("a", "prefill", 1, [[DAY + 10, DAY + 30]]),
           DeviceUptime("b", "decode", 2, [[DAY + 20, DAY + 40.9], [DAY + 50, DAY + 7200]])]
    window = live_window([], ups, now=DAY + 3600)
    assert window.start.timestamp() == DAY and window.seconds == 3600
    assert occupancy_schedule(ups, window) == [
        Occupancy(10, 20, 1), Occupancy(20, 30, 3), Occupancy(30, 40, 2), Occupancy(50, 3600, 2)]


def test_the_live_day_reports_the_ledger_exactly():
    tally = Tally(PRICES, price_as="deepseek-v3")
    for seq, started in enumerate((at(15, 5), at(15, 50), at(16, 40), at(16, 59)), start=1):
        tally.add_record(seq, record(started, hit=64 * seq, miss=7, out=33, model="v3-mini"))
    tally.credit("decode-0", "decode", DAY + 15 * 3600, DAY + 17 * 3600, now=DAY + 17.5 * 3600)
    tally.credit("expert-worker-0", "expert-worker", DAY + 15.5 * 3600, DAY + 17 * 3600,
                 now=DAY + 17.5 * 3600)
    window = live_window(tally.buckets.values(), tally.uptimes.values(), now=DAY + 17.5 * 3600)
    usage = live_usage(tally.buckets.values(), tally.uptimes.values(), window,
                       usd_per_gpu_hour=Decimal(2), gpus_per_node=8)
    report = compute_report(usage, tally.prices)
    t = totals(tally)
    assert report.revenue_usd == t.revenue_usd
    assert report.theoretical_revenue_usd == t.theoretical_revenue_usd
    assert report.tokens.input_cache_hit == 64 * (1 + 2 + 3 + 4) and report.tokens.output == 132
    assert report.cost_usd == Decimal(2) * Decimal("3.5")  # 2 h + 1.5 h of one device each
    assert report.revenue_by_tier.keys() == {"standard", "off_peak"}
    assert [h.label for h in report.hours] == ["15:00", "16:00", "17:00"]
    assert report.hours[1].revenue_usd == usd(64 * 3, 7, 33, ("0.035", "0.135", "0.55")) \
        + usd(64 * 4, 7, 33, ("0.035", "0.135", "0.55"))


def test_a_window_from_a_later_hour_leaves_earlier_buckets_out():
    tally = Tally(PRICES)
    tally.add_record(1, record(at(9)))
    tally.add_record(2, record(at(11, 15)))
    window = live_window(tally.buckets.values(), [], now=DAY + 12 * 3600, since=at(10, 30))
    assert window.start == at(10)
    usage = live_usage(tally.buckets.values(), [], window, usd_per_gpu_hour=Decimal(2),
                       gpus_per_node=8)
    assert [(b.start, b.end) for b in usage.traffic] == [(3600, 7200)]
    assert compute_report(usage, PRICES).revenue_usd == usd(0, 100, 10)


def test_empty_ledger_has_no_window():
    assert live_window([], [], now=DAY) is None
    assert TokenBucket(0, 3600, "m", "").key != TokenBucket(0, 3600, "m", "t").key


def test_a_tenants_report_has_its_tokens_and_the_whole_cost():
    tally = Tally(PRICES)
    tally.add_record(1, record(at(9), miss=100, tenant="acme"))
    tally.add_record(2, record(at(9), miss=900, tenant="other"))
    tally.credit("decode-0", "decode", DAY + 9 * 3600, DAY + 10 * 3600, now=DAY + 10 * 3600)
    window = live_window(tally.buckets.values(), tally.uptimes.values(), now=DAY + 10 * 3600)
    usage = live_usage(tally.buckets.values(), tally.uptimes.values(), window, tenant="acme",
                       usd_per_gpu_hour=Decimal(2), gpus_per_node=8)
    report = compute_report(usage, PRICES)
    assert report.tokens.input_cache_miss == 100 and report.cost_usd == 2
    assert any("tenant 'acme'" in note for note in report.notes)
