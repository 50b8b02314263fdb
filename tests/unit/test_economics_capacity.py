"""Capacity model: DeepSeek's throughputs give its node count; hourly unit sizing; what-ifs."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from services.cli.economics import data_path
from services.economics import money
from services.economics.capacity import (
    CapacityAssumptions,
    default_curve,
    fluid_nodes,
    hourly_traffic,
    integer_weights,
    plan_capacity,
    plan_schedule,
    units_needed,
    with_cache_hit_rate,
)
from services.economics.money import TokenCounts
from services.economics.reproduce import reference_usage
from services.economics.usage import Deployment, NodeThroughput

DEEPSEEK = CapacityAssumptions(
    throughput=NodeThroughput(Decimal(73_700), Decimal(14_800)),
    deployment=Deployment(4, 18),
    gpus_per_node=8,
)
DAY_TOKENS = TokenCounts(342 * 10**9, 266 * 10**9, 168 * 10**9)


@pytest.fixture(scope="module")
def day6():
    return reference_usage(json.loads(data_path("deepseek_day6.json").read_text(),
                                      parse_float=Decimal))


def test_deepseek_throughputs_give_the_observed_node_count():
    fluid = fluid_nodes(DAY_TOKENS, 86_400, DEEPSEEK)
    # 608e9 / (73,700 x 86,400) and 168e9 / (14,800 x 86,400)
    assert abs(fluid.prefill - Decimal("95.4821")) < Decimal("0.0001")
    assert abs(fluid.decode - Decimal("131.3814")) < Decimal("0.0001")
    assert abs(fluid.total - Decimal("226.75")) / Decimal("226.75") < Decimal("0.001")


def test_units_round_up_and_respect_the_minimum():
    assert units_needed(Decimal("117.07"), 4, 1) == 30
    assert units_needed(Decimal(120), 4, 1) == 30
    assert units_needed(Decimal("161.08"), 18, 1) == 9
    assert units_needed(Decimal(0), 18, 1) == 1
    assert units_needed(Decimal(0), 18, 0) == 0


def test_plan_schedule_hand_case():
    # One hour with 73,700 x 3,600 x 5 input tokens needs 5 prefill nodes -> 2 units of 4;
    # 14,800 x 3,600 x 18 output tokens need exactly 18 decode nodes -> 1 unit.
    tokens = TokenCounts(0, 73_700 * 3_600 * 5, 14_800 * 3_600 * 18)
    traffic = hourly_traffic({"m": tokens}, [(0, 3600)], [1])
    schedule = plan_schedule(traffic, [(0, 3600)], DEEPSEEK)
    assert schedule.gpus_at(0, "prefill") == 8 * 8
    assert schedule.gpus_at(0, "decode") == 18 * 8


def test_cache_hit_rate_override_keeps_input_and_output():
    forty = with_cache_hit_rate(DAY_TOKENS, Decimal("0.4"))
    assert forty == TokenCounts(243_200_000_000, 364_800_000_000, 168 * 10**9)
    with pytest.raises(ValueError):
        with_cache_hit_rate(DAY_TOKENS, Decimal("1.5"))


def test_prefill_hit_cost_moves_the_prefill_rate_with_the_hit_rate():
    assumptions = CapacityAssumptions(
        throughput=DEEPSEEK.throughput,
        deployment=DEEPSEEK.deployment,
        gpus_per_node=8,
        prefill_hit_cost=Decimal(0),
        reference_hit_fraction=Decimal("0.5"),
    )
    assert assumptions.prefill_rate(Decimal("0.5")) == 73_700
    # Hits free: a node does 36,850 misses/s; at 0 % hits that is its whole rate.
    assert assumptions.prefill_rate(Decimal(0)) == 36_850
    assert DEEPSEEK.prefill_rate(Decimal(0)) == 73_700  # default: rate independent of hits
    with pytest.raises(ValueError):
        CapacityAssumptions(
            DEEPSEEK.throughput, DEEPSEEK.deployment, 8, prefill_hit_cost=Decimal("0.5")
        )


def test_integer_weights_are_exact():
    assert integer_weights([Decimal("0.25"), Decimal("1.5"), Decimal(2)]) == [25, 150, 200]
    with pytest.raises(ValueError):
        integer_weights([Decimal(-1)])


def test_plan_on_deepseek_day(day6):
    curve, source = default_curve(day6, day6.prices)
    assert sum(curve) == 5442 * 8 * 3600 and "node schedule" in source
    totals = {"deepseek-r1": day6.tokens}
    plan = plan_capacity(
        day6,
        day6.prices,
        DEEPSEEK,
        totals=totals,
        curve=curve,
        curve_source=source,
        usd_per_gpu_hour=Decimal("2.50"),
    )
    report = plan.report
    assert report.tokens == day6.tokens
    assert report.theoretical_revenue_usd == Decimal("562100")
    # Cost is exactly node-hours x 8 GPUs x $2.50.
    assert report.cost_usd == report.occupied.node_hours * 8 * Decimal("2.50")
    # Peak hour: 608e9 x 278/5442 / (73,700 x 3,600) = 117.07 -> 120; decode 161.08 -> 162.
    assert plan.planned_nodes[0] == (120, 162)
    for prefill_nodes, decode_nodes in plan.planned_nodes:
        assert prefill_nodes % 4 == 0 and decode_nodes % 18 == 0
    assert len(day6.window.hour_slots()) == 24
    assert plan.observed_avg_nodes == Decimal("226.75")
    assert abs(plan.fluid_vs_observed) < Decimal("0.001")
    assert report.margin == money.margin(report.revenue_usd, report.cost_usd)
