"""JSON views of reports, reproductions and capacity plans (field names documented in
docs/economics.md and kept stable). Exact decimals (money, hours, node counts, margins) are
JSON strings such as "87072" or "5.4555769937..."; token counts are JSON integers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from services.economics import money
from services.economics.capacity import CapacityPlan
from services.economics.report import HourRow, Report
from services.economics.reproduce import Reproduction
from services.economics.tokens import TokenCounts

SCHEMA_VERSION = 1
OCCUPANCY = ("node_hours", "avg_nodes", "peak_nodes", "cost_usd")


def value(v: Any) -> Any:
    if isinstance(v, Decimal):
        return money.plain(v)
    if isinstance(v, TokenCounts):
        return {"input_cache_hit": v.input_cache_hit, "input_cache_miss": v.input_cache_miss,
                "input_total": v.input_total, "output_total": v.output}
    return {k: value(x) for k, x in v.items()} if isinstance(v, dict) else v


def pick(obj: Any, *names: str) -> dict[str, Any]:
    """The named attributes of `obj` as JSON values (None stays null)."""
    return {name: value(getattr(obj, name)) for name in names}


def hour_json(row: HourRow, report: Report) -> dict[str, Any]:
    return {"from": report.window.at(row.start).isoformat(),
            "to": report.window.at(row.end).isoformat(), "label": row.label,
            **pick(row.occupied, *OCCUPANCY),
            **pick(row, "revenue_usd", "theoretical_revenue_usd", "margin", "tokens")}


def _billed(report: Report) -> dict[str, Any]:
    """Occupancy, cost and both revenues with their margins."""
    return {**pick(report.occupied, *OCCUPANCY), **pick(report, "gpu_hours", "revenue_usd",
            "margin", "theoretical_revenue_usd", "theoretical_margin")}


def _tail(report: Report, charts: list[str] | None) -> dict[str, Any]:
    return {"notes": list(report.notes), "charts": charts or []}


def report_json(report: Report, charts: list[str] | None = None) -> dict[str, Any]:
    w, published = report.window, report.published
    return {
        "schema_version": SCHEMA_VERSION,
        "window": {"from": w.start.isoformat(), "to": w.end.isoformat(), "timezone": str(w.tz),
                   "hours": value(money.hours(w.seconds))},
        "prices": {"version": report.prices_version, "source": report.prices_source},
        **pick(report, "gpus_per_node", "usd_per_gpu_hour"), **_billed(report),
        **pick(report, "tokens", "revenue_by_model", "revenue_by_tier", "tokens_by_tier"),
        "phases": {phase: pick(o, *OCCUPANCY) for phase, o in report.phases.items()},
        "hourly_tokens_source": "usage" if report.traffic_timed else f"spread_by_{report.spread}",
        "hours": [hour_json(row, report) for row in report.hours],
        "published": published and pick(published, "cost_usd", "revenue_usd", "margin",
                                        "peak_nodes", "avg_nodes"),
        **_tail(report, charts),
    }


def reproduction_json(rep: Reproduction, charts: list[str] | None = None) -> dict[str, Any]:
    report = rep.report
    return {
        "schema_version": SCHEMA_VERSION, "billed_as": rep.billed_as,
        **pick(report.occupied, *OCCUPANCY), "gpu_hours": value(report.gpu_hours),
        **pick(rep, "revenue_usd", "margin"),
        "published": pick(rep.published, "cost_usd", "revenue_usd", "margin", "peak_nodes",
                          "avg_nodes"),
        **pick(rep, "revenue_vs_published", "margin_from_published_revenue"),
        "tokens": value(report.tokens), "discount_windows": list(rep.discount_windows),
        "discounted_node_hours": value(rep.tiered_node_hours),
        "discounted_tokens": value(rep.tiered_tokens),
        "variants": [pick(v, "model", "off_peak_discount", "revenue_usd", "margin")
                     for v in rep.variants],
        "hours": [hour_json(row, report) for row in report.hours],
        **_tail(report, charts),
    }


def capacity_json(plan: CapacityPlan, charts: list[str] | None = None) -> dict[str, Any]:
    report, a, fluid = plan.report, plan.assumptions, plan.fluid
    return {
        "schema_version": SCHEMA_VERSION,
        "assumptions": {
            "prefill_input_tok_per_s_per_node": value(a.throughput.prefill_input_tok_per_s),
            "prefill_input_tok_per_s_per_node_effective": value(fluid.prefill_rate),
            "decode_output_tok_per_s_per_node": value(a.throughput.decode_output_tok_per_s),
            "prefill_unit_nodes": a.deployment.prefill_unit_nodes,
            "decode_unit_nodes": a.deployment.decode_unit_nodes,
            **pick(a, "min_units", "prefill_hit_cost", "gpus_per_node"),
            "usd_per_gpu_hour": value(report.usd_per_gpu_hour), "hourly_curve": plan.curve_source},
        "tokens": value(plan.tokens),
        "fluid": {"prefill_avg_nodes": value(fluid.prefill),
                  "decode_avg_nodes": value(fluid.decode), "avg_nodes": value(fluid.total),
                  **pick(plan, "observed_avg_nodes"),
                  "vs_observed": value(plan.fluid_vs_observed)},
        **_billed(report),
        "phases": {phase: pick(o, *OCCUPANCY) for phase, o in report.phases.items()},
        "hours": [{**hour_json(row, report), **pick(planned, "prefill_nodes", "decode_nodes")}
                  for row, planned in zip(report.hours, plan.planned_hours, strict=True)],
        **_tail(report, charts),
    }
