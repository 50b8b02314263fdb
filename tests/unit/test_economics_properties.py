"""Property tests: apportioning, revenue monotone in tokens, margin = revenue / cost - 1."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from services.cli.economics import load_prices
from services.economics import money
from services.economics.money import TokenCounts
from services.economics.report import compute_report
from services.economics.usage import DayUsage, Occupancy, Schedule, TrafficBucket
from services.economics.window import Window

PRICES = load_prices(None)
WINDOW = Window(datetime(2025, 3, 1, 12, tzinfo=UTC), datetime(2025, 3, 2, 12, tzinfo=UTC), UTC)
DAY = 86_400
counts = st.integers(min_value=0, max_value=10**13)
token_counts = st.builds(TokenCounts, counts, counts, counts)
models = st.sampled_from(["deepseek-r1", "deepseek-v3"])


@st.composite
def buckets(draw):
    start = draw(st.integers(0, DAY - 1))
    end = draw(st.integers(start + 1, DAY))
    return TrafficBucket(start, end, draw(models), draw(token_counts))


@st.composite
def schedules(draw):
    cuts = sorted(set(draw(st.lists(st.integers(1, DAY - 1), max_size=6))))
    bounds = [0, *cuts, DAY]
    gpus = draw(st.lists(st.integers(0, 4000), min_size=len(bounds) - 1, max_size=len(bounds) - 1))
    return Schedule(
        tuple(Occupancy(a, b, g) for a, b, g in zip(bounds[:-1], bounds[1:], gpus, strict=True)), 8
    )


def terminates(value: Fraction) -> bool:
    """Whether a decimal expansion of `value` is finite (denominator 2**a * 5**b)."""
    d = value.denominator
    for prime in (2, 5):
        while d % prime == 0:
            d //= prime
    return d == 1


def usage_of(traffic, schedule, timed=True, gpu_price=Decimal(2)) -> DayUsage:
    return DayUsage(WINDOW, schedule, gpu_price, tuple(traffic), traffic_timed=timed)


@given(st.integers(0, 10**15), st.lists(st.integers(0, 10**6), min_size=1, max_size=30))
def test_apportion_is_whole_exact_and_fair(total, weights):
    parts = money.apportion(total, weights)
    assert sum(parts) == total
    weight_sum = sum(weights) or len(weights)
    for part, weight in zip(parts, weights if sum(weights) else [1] * len(weights), strict=True):
        assert abs(Fraction(part) - Fraction(total * weight, weight_sum)) < 1


@settings(max_examples=60, deadline=None)
@given(st.lists(buckets(), min_size=1, max_size=4), schedules(), st.integers(0, 3), token_counts)
def test_revenue_is_monotone_in_tokens(traffic, schedule, which, extra):
    base = compute_report(usage_of(traffic, schedule), PRICES)
    which %= len(traffic)
    grown = list(traffic)
    grown[which] = TrafficBucket(
        traffic[which].start,
        traffic[which].end,
        traffic[which].model,
        traffic[which].tokens + extra,
    )
    more = compute_report(usage_of(grown, schedule), PRICES)
    assert more.revenue_usd >= base.revenue_usd
    assert more.theoretical_revenue_usd >= base.theoretical_revenue_usd
    assert more.tokens == base.tokens + extra
    # Tiers only discount: billed revenue never exceeds list-price revenue.
    assert more.revenue_usd <= more.theoretical_revenue_usd


@settings(max_examples=60, deadline=None)
@given(
    st.lists(buckets(), min_size=1, max_size=4),
    schedules(),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal(100), places=2),
    st.booleans(),
)
def test_margin_is_revenue_over_cost_minus_one(traffic, schedule, gpu_price, timed):
    report = compute_report(usage_of(traffic, schedule, timed, gpu_price), PRICES)
    gpu_seconds = schedule.gpu_seconds(0, DAY)
    exact_cost = Fraction(gpu_seconds) * Fraction(gpu_price) / 3600
    # Division by 3600 may not terminate: it is carried to 50 significant digits.
    assert abs(Fraction(report.cost_usd) - exact_cost) <= exact_cost * Fraction(1, 10**48)
    if terminates(exact_cost):
        assert Fraction(report.cost_usd) == exact_cost
    assert report.tokens == TokenCounts.sum(b.tokens for b in traffic)
    if gpu_seconds == 0:
        assert report.margin is None
        return
    exact = Fraction(report.revenue_usd) / (Fraction(gpu_seconds) * Fraction(gpu_price) / 3600) - 1
    assert abs(Fraction(report.margin) - exact) <= abs(exact) * Fraction(1, 10**40) + Fraction(
        1, 10**40
    )


@settings(max_examples=40, deadline=None)
@given(token_counts, models, st.integers(0, DAY - 1))
def test_a_single_request_bucket_pays_the_tier_at_its_start(tokens, model, offset):
    usage = usage_of([TrafficBucket(offset, offset + 1, model, tokens)], Schedule((), 8))
    report = compute_report(usage, PRICES)
    started = WINDOW.start + timedelta(seconds=offset)
    assert report.revenue_usd == PRICES.price(model, started)[1].charge(tokens)
