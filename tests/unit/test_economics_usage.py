"""Usage files (one shape: occupancy intervals, hourly token rows), DeepSeek's published day read
by the reproduction's adapter, and rejections naming the field."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.cli.economics import data_path
from services.economics.money import TokenCounts
from services.economics.reproduce import reference_usage
from services.economics.spec import DataError
from services.economics.usage import Occupancy, Schedule, parse_usage
from services.economics.window import Window

UTC8 = timezone(timedelta(hours=8))


@pytest.fixture(scope="module")
def day6() -> dict:
    return json.loads(data_path("deepseek_day6.json").read_text(), parse_float=Decimal)


def minimal(**overrides) -> dict:
    doc = {
        "window": {"timezone": "UTC", "from": "2025-03-01T00:00", "to": "2025-03-02T00:00"},
        "hardware": {"gpus_per_node": 8, "usd_per_gpu_hour": "2"},
        "node_schedule": [{"from": "00:00", "to": "00:00", "nodes": 1}],
        "hourly_tokens": [
            {
                "from": "00:00",
                "to": "00:00",
                "model": "deepseek-v3",
                "input_cache_hit": 40,
                "input_cache_miss": 60,
                "output_total": 10,
            }
        ],
    }
    doc.update(overrides)
    return doc


def test_reference_file_reads_as_a_day_of_usage(day6):
    usage = reference_usage(day6)
    assert usage.window.seconds == 86_400
    assert usage.window.start == datetime(2025, 2, 27, 4, 0, tzinfo=UTC)
    assert usage.schedule.gpu_seconds(0, 86_400) == 5442 * 8 * 3600
    assert usage.schedule.peak_gpus(0, 86_400) == 278 * 8
    assert usage.models == ("deepseek-r1",)
    assert usage.tokens == TokenCounts(342 * 10**9, 266 * 10**9, 168 * 10**9)
    assert usage.traffic_timed is False
    assert usage.usd_per_gpu_hour == Decimal("2.0")
    assert usage.throughput.prefill_input_tok_per_s == 73700
    assert (usage.deployment.prefill_unit_nodes, usage.deployment.decode_unit_nodes) == (4, 18)
    assert usage.published.cost_usd == 87072
    assert usage.prices is not None and "deepseek-v3" in usage.prices.models


def test_clock_times_map_into_a_window_that_crosses_midnight(day6):
    usage = reference_usage(day6)
    intervals = usage.schedule.intervals
    # 12:00 -> 00:00 is the first 12 h; 08:30 -> 12:00 is the last 3.5 h.
    assert (intervals[0].start, intervals[0].end) == (0, 12 * 3600)
    assert (intervals[-1].start, intervals[-1].end) == (20.5 * 3600, 24 * 3600)


def test_node_schedule_utc8_is_read_in_utc8_whatever_the_window_zone(day6):
    doc = copy.deepcopy(day6)
    doc["window"] = {"timezone": "UTC", "from": "2025-02-27T04:00", "to": "2025-02-28T04:00"}
    usage = reference_usage(doc)
    assert usage.schedule.intervals == reference_usage(day6).schedule.intervals


def test_the_reference_shapes_are_refused_in_a_usage_file(day6):
    # DeepSeek's day is read by the reproduction's adapter only; a usage file gives intervals.
    with pytest.raises(DataError) as err:
        parse_usage(day6)
    assert err.value.path == "node_schedule_utc8"
    assert "give node_schedule" in str(err.value)


def test_samples_are_refused_naming_the_field():
    # Sample-and-hold occupancy is no longer an input form: intervals are.
    doc = minimal(node_samples=[{"at": "00:10", "nodes": 2}, {"at": "06:00", "nodes": 1}])
    del doc["node_schedule"]
    with pytest.raises(DataError) as err:
        parse_usage(doc)
    assert err.value.path == "node_samples"
    assert str(err.value).startswith("node_samples: is not read from usage files; give "
                                     "node_schedule")


def test_phased_schedule_and_gpu_counts():
    doc = minimal(
        node_schedule=[
            {"from": "00:00", "to": "12:00", "nodes": 4, "phase": "prefill"},
            {"from": "00:00", "to": "00:00", "nodes": 18, "phase": "decode"},
        ]
    )
    schedule = parse_usage(doc).schedule
    assert schedule.phased
    assert schedule.gpu_seconds(0, 86_400, "prefill") == 32 * 12 * 3600
    assert schedule.gpu_seconds(0, 86_400, "decode") == 144 * 86_400
    assert schedule.peak_gpus(0, 86_400) == 176


def test_hourly_rows_default_to_one_hour():
    doc = minimal(
        hourly_tokens=[
            {
                "from": "03:00",
                "model": "deepseek-v3",
                "input_cache_hit": 1,
                "input_cache_miss": 2,
                "output_total": 3,
            },
            {
                "from": "04:00",
                "to": "06:00",
                "model": "deepseek-r1",
                "input_cache_hit": 5,
                "input_cache_miss": 0,
                "output_total": 0,
            },
        ]
    )
    usage = parse_usage(doc)
    assert usage.traffic_timed
    first, second = usage.traffic
    assert (first.start, first.end, first.model) == (3 * 3600, 4 * 3600, "deepseek-v3")
    assert (second.start, second.end, second.model) == (4 * 3600, 6 * 3600, "deepseek-r1")
    assert usage.model_fields["deepseek-r1"] == "hourly_tokens[1].model"


def test_iso_datetimes_are_accepted_and_windows_may_differ_from_a_day():
    doc = minimal(
        window={"timezone": "UTC-05:00", "from": "2025-03-01T00:00", "to": "2025-03-03T00:00"},
        node_schedule=[{"from": "2025-03-01T00:00", "to": "2025-03-03T00:00", "nodes": 1}],
    )
    doc["hourly_tokens"][0] |= {"from": "2025-03-01T00:00", "to": "2025-03-03T00:00"}
    usage = parse_usage(doc)
    assert usage.window.seconds == 2 * 86_400
    assert usage.window.start == datetime(2025, 3, 1, 5, 0, tzinfo=UTC)


def _broken(mutate) -> dict:
    doc = minimal()
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.pop("window"), "window"),
        (lambda d: d["window"].update(timezone="Europe/Paris"), "window.timezone"),
        (lambda d: d["window"].update(to="2025-02-28T00:00"), "window.to"),
        (lambda d: d["hardware"].pop("usd_per_gpu_hour"), "hardware.usd_per_gpu_hour"),
        (lambda d: d["hardware"].update(gpus_per_node=0), "hardware.gpus_per_node"),
        (lambda d: d["hourly_tokens"][0].pop("output_total"), "hourly_tokens[0].output_total"),
        (lambda d: d["hourly_tokens"][0].update(output_total=-5), "hourly_tokens[0].output_total"),
        (
            lambda d: d["hourly_tokens"][0].update(output_total=Decimal("1.5")),
            "hourly_tokens[0].output_total",
        ),
        (
            lambda d: d["hourly_tokens"][0].update(output_total="many"),
            "hourly_tokens[0].output_total",
        ),
        (
            lambda d: d["hourly_tokens"][0].update(output_total=True),
            "hourly_tokens[0].output_total",
        ),
        # The day-totals forms (input_total beside the cache hits, `tokens`, `billed_as`,
        # `tokens_by_model`) are refused naming the field.
        (
            lambda d: d["hourly_tokens"][0].update(input_total=100),
            "hourly_tokens[0].input_total",
        ),
        (
            lambda d: d["hourly_tokens"][0].pop("input_cache_miss"),
            "hourly_tokens[0].input_cache_miss",
        ),
        (
            lambda d: d["hourly_tokens"][0].update(input_cache_miss=-7),
            "hourly_tokens[0].input_cache_miss",
        ),
        (lambda d: d.pop("hourly_tokens"), "hourly_tokens"),
        (lambda d: d["hourly_tokens"][0].pop("model"), "hourly_tokens[0].model"),
        (lambda d: d.update(billed_as="deepseek-v3"), "billed_as"),
        (lambda d: d.pop("node_schedule"), "node_schedule"),
        (lambda d: d.update(node_schedule=[]), "node_schedule"),
        (lambda d: d.update(node_schedule="all day"), "node_schedule"),
        (lambda d: d["node_schedule"][0].pop("nodes"), "node_schedule[0].nodes"),
        (lambda d: d["node_schedule"][0].update(gpus=8), "node_schedule[0].gpus"),
        (lambda d: d["node_schedule"][0].update(nodes=-1), "node_schedule[0].nodes"),
        (lambda d: d["node_schedule"][0].update(to="24:30"), "node_schedule[0].to"),
        (lambda d: d["node_schedule"][0].update(phase="train"), "node_schedule[0].phase"),
        (
            lambda d: d.update(
                node_schedule=[
                    {"from": "00:00", "to": "12:00", "nodes": 1},
                    {"from": "11:00", "to": "13:00", "nodes": 1},
                ]
            ),
            "node_schedule[1].from",
        ),
        (
            lambda d: d.update(
                node_schedule=[{"from": "00:00", "to": "2025-03-02T01:00", "nodes": 1}]
            ),
            "node_schedule[0].to",
        ),
        (
            lambda d: d.update(
                node_schedule=[
                    {"from": "00:00", "to": "12:00", "nodes": 1, "phase": "decode"},
                    {"from": "12:00", "to": "13:00", "nodes": 1},
                ]
            ),
            "node_schedule[1].phase",
        ),
        (
            lambda d: (
                d.update(node_samples=[{"at": "05:00", "nodes": 1}, {"at": "04:00", "nodes": 1}])
                or d.pop("node_schedule")
            ),
            "node_samples",
        ),
        (
            lambda d: d.update(
                tokens={"input_total": 100, "input_cache_hit": 40, "output_total": 9}
            ),
            "tokens",
        ),
        (
            lambda d: d.update(
                hourly_tokens=[
                    {
                        "model": "deepseek-v3",
                        "input_cache_hit": 0,
                        "input_cache_miss": 1,
                        "output_total": 0,
                    }
                ]
            ),
            "hourly_tokens[0].from",
        ),
        (
            lambda d: d.update(
                hourly_tokens=[
                    {
                        "from": "11:00",
                        "to": "10:00",
                        "model": "deepseek-v3",
                        "input_cache_hit": 0,
                        "input_cache_miss": 1,
                        "output_total": 0,
                    }
                ]
            ),
            "hourly_tokens[0].to",
        ),
        (
            lambda d: d.update(
                tokens_by_model={
                    "deepseek-r1": {"input_total": 100, "input_cache_hit": 41, "output_total": 10}
                }
            ),
            "tokens_by_model",
        ),
    ],
)
def test_malformed_usage_is_rejected_naming_the_field(mutate, path):
    with pytest.raises(DataError) as err:
        parse_usage(_broken(mutate))
    assert err.value.path == path, str(err.value)
    assert str(err.value).startswith(path + ":")


def test_hit_fraction_is_not_a_usage_field_and_the_reference_bills_its_counts(day6):
    # A usage file's rows carry counts only; the hit fraction DeepSeek published beside its
    # rounded counts (0.563) is informational: the counts are billed, whatever it says.
    doc = minimal()
    doc["hourly_tokens"][0]["input_cache_hit_fraction"] = "0.9"
    with pytest.raises(DataError) as err:
        parse_usage(doc)
    assert err.value.path == "hourly_tokens[0].input_cache_hit_fraction"
    reference = copy.deepcopy(day6)
    reference["tokens"]["input_cache_hit_fraction"] = Decimal("0.9")
    assert reference_usage(reference).tokens == TokenCounts(342 * 10**9, 266 * 10**9, 168 * 10**9)


def test_schedule_integrates_with_prefix_sums():
    schedule = Schedule(
        (Occupancy(0, 100, 8), Occupancy(100, 250, 16), Occupancy(400, 500, 8)), gpus_per_node=8
    )
    assert schedule.gpu_seconds(0, 500) == 800 + 2400 + 800
    assert schedule.gpu_seconds(50, 120) == 400 + 320
    assert schedule.gpu_seconds(250, 400) == 0  # a gap: nothing ran
    assert schedule.gpus_at(300) == 0 and schedule.gpus_at(450) == 8
    assert schedule.peak_gpus(0, 500) == 16
    assert schedule.peak_gpus(260, 500) == 8


def test_schedule_rejects_overlaps_and_mixed_phases():
    with pytest.raises(ValueError, match="overlap"):
        Schedule((Occupancy(0, 10, 1), Occupancy(5, 20, 1)), 8)
    with pytest.raises(ValueError, match="phase"):
        Schedule((Occupancy(0, 10, 1, "decode"), Occupancy(10, 20, 1)), 8)
    phased = (Occupancy(0, 10, 8, "prefill"), Occupancy(10, 20, 16, "prefill"),
              Occupancy(0, 20, 8, "decode"))
    schedule = Schedule(phased, 8)
    assert schedule.gpu_seconds(0, 20, "prefill") == 80 + 160
    assert schedule.gpu_seconds(0, 20, "decode") == 160


def test_window_rejects_naive_or_empty():
    start = datetime(2025, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        Window(start, start, UTC)
    with pytest.raises(ValueError):
        Window(datetime(2025, 3, 1), datetime(2025, 3, 2), UTC)
