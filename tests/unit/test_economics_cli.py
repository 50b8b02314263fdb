"""`epserve economics ...` end to end through the real argument parser."""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction

import pytest

from services.cli import main
from services.cli.economics import data_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["economics", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_usage(tmp_path, doc: dict, name: str = "usage.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def small_usage(**extra) -> dict:
    doc = {
        "window": {"timezone": "UTC", "from": "2025-03-01T00:00", "to": "2025-03-02T00:00"},
        "hardware": {"gpus_per_node": 8, "usd_per_gpu_hour": 3},
        "node_schedule": [
            {"from": "00:00", "to": "12:00", "nodes": 10},
            {"from": "12:00", "to": "00:00", "nodes": 20},
        ],
        "hourly_tokens": [
            {
                "from": f"{h:02d}:00",
                "model": "deepseek-v3",
                "input_cache_hit": 4 * 10**8,
                "input_cache_miss": 6 * 10**8,
                "output_total": 10**8,
            }
            for h in range(24)
        ],
    }
    doc.update(extra)
    return doc


def test_reproduce_prints_the_published_figures(capsys):
    code, out, _ = run(capsys, "reproduce")
    assert code == 0
    assert "$87,072" in out and "exact" in out
    assert "$562,100" in out and "$562,027" in out and "+0.013%" in out
    assert "545% (545.56%)" in out
    assert "5,442" in out and "226.75" in out and "278" in out
    assert "$280,560" in out  # V3 prices
    assert "off-peak" in out and "applied" in out
    assert "assumption:" in out and "node schedule" in out
    assert "rounded" in out


def test_reproduce_json_fields(capsys):
    code, out, _ = run(capsys, "reproduce", "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["cost_usd"] == "87072"
    assert doc["revenue_usd"] == "562100"
    assert (
        doc["node_hours"] == "5442" and doc["avg_nodes"] == "226.75" and doc["peak_nodes"] == "278"
    )
    assert Decimal(doc["margin"]).quantize(Decimal("0.01")) == Decimal("5.46")
    assert abs(Decimal(doc["revenue_vs_published"])) < Decimal("0.0002")
    assert len(doc["hours"]) == 24
    assert {(v["model"], v["off_peak_discount"]) for v in doc["variants"]} == {
        ("deepseek-r1", False),
        ("deepseek-r1", True),
        ("deepseek-v3", False),
        ("deepseek-v3", True),
    }


def reference_day_as_usage() -> dict:
    """DeepSeek's published day written in the usage file's shape: its UTC+8 schedule as
    intervals, its day totals as one row over the whole day, billed as R1."""
    day = json.loads(data_path("deepseek_day6.json").read_text())
    tokens = day["tokens"]
    return {
        "window": day["window"],
        "hardware": day["hardware"],
        "node_schedule": day["node_schedule_utc8"],
        "hourly_tokens": [
            {
                "from": "12:00",
                "to": "12:00",
                "model": "deepseek-r1",
                "input_cache_hit": int(tokens["input_cache_hit"]),
                "input_cache_miss": int(tokens["input_total"] - tokens["input_cache_hit"]),
                "output_total": int(tokens["output_total"]),
            }
        ],
    }


def test_report_on_the_reference_day_writes_charts(capsys, tmp_path):
    usage = write_usage(tmp_path, reference_day_as_usage())
    code, out, _ = run(capsys, "report", "--usage", str(usage), "--chart-dir", str(tmp_path))
    assert code == 0
    assert "$87,072" in out and "$562,100" in out and "226.75" in out
    for name in ("economics_income_cost.png", "economics_nodes.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    # The published file itself keeps DeepSeek's shapes, which only `reproduce` reads.
    code, out, err = run(capsys, "report", "--usage", str(data_path("deepseek_day6.json")))
    assert code == 2 and out == ""
    assert "deepseek_day6.json: node_schedule_utc8: is not read from usage files" in err


def test_report_json_matches_independent_arithmetic(capsys, tmp_path):
    usage = write_usage(tmp_path, small_usage())
    code, out, _ = run(capsys, "report", "--usage", str(usage), "--json", "--no-charts")
    doc = json.loads(out)
    assert code == 0
    # 10 x 12 + 20 x 12 = 360 node-hours x 8 GPUs x $3.
    assert doc["node_hours"] == "360" and doc["avg_nodes"] == "15" and doc["peak_nodes"] == "20"
    assert doc["cost_usd"] == "8640"
    # Per hour at v3 list: 0.4e9 x .07 + 0.6e9 x .27 + 0.1e9 x 1.10 = 28 + 162 + 110 = 300.
    # Off-peak (16:30-00:30 UTC) covers 00:00-00:30 and 16:30-24:00 of this window: 8 hours at
    # 0.4e9 x .035 + 0.6e9 x .135 + 0.1e9 x .55 = 150 per hour; 16 hours at 300.
    assert doc["theoretical_revenue_usd"] == "7200"
    assert doc["revenue_usd"] == str(300 * 16 + 150 * 8)
    assert doc["charts"] == [] and doc["hourly_tokens_source"] == "usage"
    assert len(doc["hours"]) == 24
    sixteen = doc["hours"][16]
    assert sixteen["label"] == "16:00" and sixteen["revenue_usd"] == "225"
    assert doc["hours"][0]["revenue_usd"] == "225"
    # -11/36 does not terminate: the JSON string carries 50 significant digits.
    assert abs(Fraction(doc["margin"]) - (Fraction(6000, 8640) - 1)) < Fraction(1, 10**45)


def test_prices_and_gpu_price_overrides(capsys, tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "version: test\nmodels:\n"
        "  deepseek-v3: {input_cache_hit: 0, input_cache_miss: 0, output: 1}\n"
    )
    usage = write_usage(tmp_path, small_usage())
    code, out, _ = run(
        capsys,
        "report",
        "--usage",
        str(usage),
        "--prices",
        str(prices),
        "--json",
        "--no-charts",
        "--usd-per-gpu-hour",
        "2.5",
    )
    doc = json.loads(out)
    assert code == 0
    assert doc["revenue_usd"] == doc["theoretical_revenue_usd"] == "2400"  # 2.4e9 output x $1/M
    assert doc["cost_usd"] == "7200" and doc["prices"]["version"] == "test"


def test_capacity_for_deepseek_figures(capsys):
    code, out, _ = run(capsys, "capacity", "--json")
    doc = json.loads(out)
    assert code == 0
    fluid = doc["fluid"]
    assert abs(Decimal(fluid["avg_nodes"]) - Decimal("226.75")) / Decimal("226.75") < Decimal(
        "0.001"
    )
    assert Decimal(doc["cost_usd"]) == Decimal(doc["node_hours"]) * 8 * 2
    assert doc["hours"][0]["prefill_nodes"] == "120" and doc["hours"][0]["decode_nodes"] == "162"


def test_capacity_what_ifs(capsys, tmp_path):
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps([1] * 24))
    code, out, _ = run(
        capsys,
        "capacity",
        "--json",
        "--cache-hit-rate",
        "0.4",
        "--usd-per-gpu-hour",
        "2.50",
        "--hourly-curve",
        str(curve),
    )
    doc = json.loads(out)
    assert code == 0
    assert doc["tokens"]["input_cache_hit"] == 243_200_000_000
    assert doc["theoretical_revenue_usd"] == "602608"
    # A flat day: 608e9/24 per hour needs 95.48 -> 96 prefill, 131.38 -> 144 decode nodes.
    assert {h["prefill_nodes"] for h in doc["hours"]} == {"96"}
    assert {h["decode_nodes"] for h in doc["hours"]} == {"144"}
    assert doc["node_hours"] == str(240 * 24) and doc["cost_usd"] == str(240 * 24 * 8 * 5 // 2)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["hourly_tokens"][3].update(output_total=-1), "hourly_tokens[3].output_total"),
        (lambda d: d["node_schedule"][1].update(to="25:00"), "node_schedule[1].to"),
        (lambda d: d["hourly_tokens"][0].update(model="deepseek-r9"), "hourly_tokens[0].model"),
        (lambda d: d["hardware"].update(usd_per_gpu_hour="cheap"), "hardware.usd_per_gpu_hour"),
    ],
)
def test_malformed_usage_exits_2_naming_the_field(capsys, tmp_path, mutate, field):
    doc = small_usage()
    mutate(doc)
    code, out, err = run(
        capsys, "report", "--usage", str(write_usage(tmp_path, doc)), "--no-charts"
    )
    assert code == 2 and out == ""
    assert f"{field}:" in err and "Traceback" not in err


def test_malformed_price_file_exits_2_naming_the_field(capsys, tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("models:\n  deepseek-v3: {input_cache_hit: 0, input_cache_miss: 0}\n")
    usage = write_usage(tmp_path, small_usage())
    code, _, err = run(
        capsys, "report", "--usage", str(usage), "--prices", str(prices), "--no-charts"
    )
    assert code == 2 and "models.deepseek-v3.output" in err


def test_unreadable_files_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "report", "--usage", str(tmp_path / "missing.json"), "--no-charts")
    assert code == 2 and "cannot read" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "report", "--usage", str(bad), "--no-charts")
    assert code == 2 and "not valid JSON" in err


def test_wrong_curve_length_exits_2(capsys, tmp_path):
    curve = tmp_path / "curve.yaml"
    curve.write_text("[1, 2, 3]\n")
    code, _, err = run(capsys, "capacity", "--hourly-curve", str(curve))
    assert code == 2 and "weights" in err and "24 hours" in err
    # One form: a list; {weights: [...]} is refused naming the file.
    curve.write_text("weights: [1, 2, 3]\n")
    code, _, err = run(capsys, "capacity", "--hourly-curve", str(curve))
    assert code == 2 and f"hourly curve {curve}: weights: must be a list, got an object" in err
