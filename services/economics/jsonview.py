"""JSON views of reports, reproductions and capacity plans (field names documented in
docs/economics.md and kept stable). Exact decimals — money, hours, node counts, margins — are
JSON strings such as "87072" or "5.4555769937..."; token counts are JSON integers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from services.economics import money
from services.economics.capacity_plan import CapacityPlan
from services.economics.report import HourRow, Occupied, Report
from services.economics.reproduce import Reproduction
from services.economics.tokens import TokenCounts
from services.economics.usage import Published

SCHEMA_VERSION = 1


def dec(value: Decimal | None) -> str | None:
    return None if value is None else money.plain(value)


def tokens_json(tokens: TokenCounts) -> dict[str, int]:
    return {
        "input_cache_hit": tokens.input_cache_hit,
        "input_cache_miss": tokens.input_cache_miss,
        "input_total": tokens.input_total,
        "output_total": tokens.output,
    }


def occupied_json(occupied: Occupied) -> dict[str, Any]:
    return {
        "node_hours": dec(occupied.node_hours),
        "avg_nodes": dec(occupied.avg_nodes),
        "peak_nodes": dec(occupied.peak_nodes),
        "cost_usd": dec(occupied.cost_usd),
    }


def hour_json(row: HourRow, report: Report) -> dict[str, Any]:
    return {
        "from": report.window.at(row.start).isoformat(),
        "to": report.window.at(row.end).isoformat(),
        "label": row.label,
        **occupied_json(row.occupied),
        "revenue_usd": dec(row.revenue_usd),
        "theoretical_revenue_usd": dec(row.theoretical_revenue_usd),
        "margin": dec(row.margin),
        "tokens": tokens_json(row.tokens),
    }


def published_json(published: Published | None) -> dict[str, Any] | None:
    if published is None:
        return None
    return {
        "cost_usd": dec(published.cost_usd),
        "revenue_usd": dec(published.revenue_usd),
        "margin": dec(published.margin),
        "peak_nodes": dec(published.peak_nodes),
        "avg_nodes": dec(published.avg_nodes),
    }


def report_json(report: Report, charts: list[str] | None = None) -> dict[str, Any]:
    window = report.window
    return {
        "schema_version": SCHEMA_VERSION,
        "window": {
            "from": window.start.isoformat(),
            "to": window.end.isoformat(),
            "timezone": str(window.tz),
            "hours": dec(money.hours(window.seconds)),
        },
        "prices": {"version": report.prices_version, "source": report.prices_source},
        "gpus_per_node": report.gpus_per_node,
        "usd_per_gpu_hour": dec(report.usd_per_gpu_hour),
        **occupied_json(report.occupied),
        "gpu_hours": dec(report.gpu_hours),
        "revenue_usd": dec(report.revenue_usd),
        "margin": dec(report.margin),
        "theoretical_revenue_usd": dec(report.theoretical_revenue_usd),
        "theoretical_margin": dec(report.theoretical_margin),
        "tokens": tokens_json(report.tokens),
        "revenue_by_model": {k: dec(v) for k, v in report.revenue_by_model.items()},
        "revenue_by_tier": {k: dec(v) for k, v in report.revenue_by_tier.items()},
        "tokens_by_tier": {k: tokens_json(v) for k, v in report.tokens_by_tier.items()},
        "phases": {phase: occupied_json(o) for phase, o in report.phases.items()},
        "hourly_tokens_source": "usage" if report.traffic_timed else f"spread_by_{report.spread}",
        "hours": [hour_json(row, report) for row in report.hours],
        "published": published_json(report.published),
        "notes": list(report.notes),
        "charts": charts or [],
    }


def reproduction_json(rep: Reproduction, charts: list[str] | None = None) -> dict[str, Any]:
    report = rep.report
    return {
        "schema_version": SCHEMA_VERSION,
        "billed_as": rep.billed_as,
        **occupied_json(report.occupied),
        "gpu_hours": dec(report.gpu_hours),
        "revenue_usd": dec(rep.revenue_usd),
        "margin": dec(rep.margin),
        "published": published_json(rep.published),
        "revenue_vs_published": dec(rep.revenue_vs_published),
        "margin_from_published_revenue": dec(rep.margin_from_published_revenue),
        "tokens": tokens_json(report.tokens),
        "discount_windows": list(rep.discount_windows),
        "discounted_node_hours": dec(rep.tiered_node_hours),
        "discounted_tokens": tokens_json(rep.tiered_tokens),
        "variants": [
            {
                "model": v.model,
                "off_peak_discount": v.off_peak_discount,
                "revenue_usd": dec(v.revenue_usd),
                "margin": dec(v.margin),
            }
            for v in rep.variants
        ],
        "hours": [hour_json(row, report) for row in report.hours],
        "notes": list(report.notes),
        "charts": charts or [],
    }


def capacity_json(plan: CapacityPlan, charts: list[str] | None = None) -> dict[str, Any]:
    report = plan.report
    a = plan.assumptions
    return {
        "schema_version": SCHEMA_VERSION,
        "assumptions": {
            "prefill_input_tok_per_s_per_node": dec(a.throughput.prefill_input_tok_per_s),
            "prefill_input_tok_per_s_per_node_effective": dec(plan.fluid.prefill_rate),
            "decode_output_tok_per_s_per_node": dec(a.throughput.decode_output_tok_per_s),
            "prefill_unit_nodes": a.deployment.prefill_unit_nodes,
            "decode_unit_nodes": a.deployment.decode_unit_nodes,
            "min_units": a.min_units,
            "prefill_hit_cost": dec(a.prefill_hit_cost),
            "gpus_per_node": a.gpus_per_node,
            "usd_per_gpu_hour": dec(report.usd_per_gpu_hour),
            "hourly_curve": plan.curve_source,
        },
        "tokens": tokens_json(plan.tokens),
        "fluid": {
            "prefill_avg_nodes": dec(plan.fluid.prefill),
            "decode_avg_nodes": dec(plan.fluid.decode),
            "avg_nodes": dec(plan.fluid.total),
            "observed_avg_nodes": dec(plan.observed_avg_nodes),
            "vs_observed": dec(plan.fluid_vs_observed),
        },
        **occupied_json(report.occupied),
        "gpu_hours": dec(report.gpu_hours),
        "revenue_usd": dec(report.revenue_usd),
        "margin": dec(report.margin),
        "theoretical_revenue_usd": dec(report.theoretical_revenue_usd),
        "theoretical_margin": dec(report.theoretical_margin),
        "phases": {phase: occupied_json(o) for phase, o in report.phases.items()},
        "hours": [
            {
                **hour_json(row, report),
                "prefill_nodes": dec(planned.prefill_nodes),
                "decode_nodes": dec(planned.decode_nodes),
            }
            for row, planned in zip(report.hours, plan.planned_hours, strict=True)
        ],
        "notes": list(report.notes),
        "charts": charts or [],
    }
