"""Text and JSON views of reports, reproductions and capacity plans.

Money is rounded here, only here, and only in the text. JSON field names are documented in
docs/economics.md and kept stable; exact decimals (money, hours, node counts, margins) are JSON
strings such as "87072" or "5.4555769937...", token counts JSON integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from services.economics import money
from services.economics.capacity import CapacityPlan
from services.economics.money import TokenCounts, number, percent, usd
from services.economics.report import Report
from services.economics.reproduce import Reproduction
from services.economics.usage import Published

SCHEMA_VERSION = 1
OCCUPANCY = ("node_hours", "avg_nodes", "peak_nodes", "cost_usd")
PUBLISHED = ("cost_usd", "revenue_usd", "margin", "peak_nodes", "avg_nodes")
BILLED = ("gpu_hours", "revenue_usd", "margin", "theoretical_revenue_usd", "theoretical_margin")


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


def _hour_rows(report: Report) -> list[dict[str, Any]]:
    return [{"from": report.window.at(row.start).isoformat(),
             "to": report.window.at(row.end).isoformat(), "label": row.label,
             **pick(row.occupied, *OCCUPANCY),
             **pick(row, "revenue_usd", "theoretical_revenue_usd", "margin", "tokens")}
            for row in report.hours]


def _tail(report: Report, charts: list[str] | None) -> dict[str, Any]:
    return {"notes": list(report.notes), "charts": charts or []}


def report_json(report: Report, charts: list[str] | None = None) -> dict[str, Any]:
    w = report.window
    return {
        "schema_version": SCHEMA_VERSION,
        "window": {"from": w.start.isoformat(), "to": w.end.isoformat(), "timezone": str(w.tz),
                   "hours": value(money.hours(w.seconds))},
        "prices": {"version": report.prices.version, "source": report.prices.source},
        **pick(report, "gpus_per_node", "usd_per_gpu_hour"),
        **pick(report.occupied, *OCCUPANCY), **pick(report, *BILLED),
        **pick(report, "tokens", "revenue_by_model", "revenue_by_tier", "tokens_by_tier"),
        "phases": {phase: pick(o, *OCCUPANCY) for phase, o in report.phases.items()},
        "hourly_tokens_source": "usage" if report.traffic_timed else f"spread_by_{report.spread}",
        "hours": _hour_rows(report),
        "published": report.published and pick(report.published, *PUBLISHED),
        **_tail(report, charts),
    }


def reproduction_json(rep: Reproduction, charts: list[str] | None = None) -> dict[str, Any]:
    report = rep.report
    return {
        "schema_version": SCHEMA_VERSION, "billed_as": rep.billed_as,
        **pick(report.occupied, *OCCUPANCY), "gpu_hours": value(report.gpu_hours),
        **pick(rep, "revenue_usd", "margin"), "published": pick(rep.published, *PUBLISHED),
        **pick(rep, "revenue_vs_published", "margin_from_published_revenue"),
        "tokens": value(report.tokens), "discount_windows": list(rep.discount_windows),
        "discounted_node_hours": value(rep.tiered_node_hours),
        "discounted_tokens": value(rep.tiered_tokens),
        "variants": [pick(v, "model", "off_peak_discount", "revenue_usd", "margin")
                     for v in rep.variants],
        "hours": _hour_rows(report),
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
            **pick(a.deployment, "prefill_unit_nodes", "decode_unit_nodes"),
            **pick(a, "min_units", "prefill_hit_cost", "gpus_per_node"),
            "usd_per_gpu_hour": value(report.usd_per_gpu_hour), "hourly_curve": plan.curve_source},
        "tokens": value(plan.tokens),
        "fluid": {"prefill_avg_nodes": value(fluid.prefill),
                  "decode_avg_nodes": value(fluid.decode), "avg_nodes": value(fluid.total),
                  **pick(plan, "observed_avg_nodes"),
                  "vs_observed": value(plan.fluid_vs_observed)},
        **pick(report.occupied, *OCCUPANCY), **pick(report, *BILLED),
        "phases": {phase: pick(o, *OCCUPANCY) for phase, o in report.phases.items()},
        "hours": [{**hour, "prefill_nodes": value(prefill), "decode_nodes": value(decode)}
                  for hour, (prefill, decode) in zip(_hour_rows(report), plan.planned_nodes,
                                                     strict=True)],
        **_tail(report, charts),
    }


# ---- text ----


def table(rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    """Columns padded to their widest cell; by default the first left-aligned, others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = right or [i > 0 for i in range(len(widths))]
    return ["  ".join(c.rjust(w) if r else c.ljust(w)
                      for c, w, r in zip(row, widths, right, strict=True)).rstrip() for row in rows]


def window_line(report: Report) -> str:
    w = report.window
    start, end = w.start.astimezone(w.tz), w.end.astimezone(w.tz)
    return f"{start:%Y-%m-%d %H:%M} -> {end:%Y-%m-%d %H:%M} ({w.tz}), {_span(report)} h"


def tokens_line(tokens: TokenCounts) -> str:
    share = (f" = {number(money.div(tokens.input_cache_hit * 100, tokens.input_total))}%"
             if tokens.input_total else "")
    return (f"input {tokens.input_total:,} (cache hit {tokens.input_cache_hit:,}{share}, "
            f"miss {tokens.input_cache_miss:,}), output {tokens.output:,}")


def figures(report: Report, published: Published | None, revenue: str, margin: str
            ) -> list[list[str]]:
    """DeepSeek's table: label, our figure, the published one (blank when not published)."""
    o, pub = report.occupied, published or Published()
    return [[label, ours, "" if theirs is None else shown(theirs)]
            for label, ours, theirs, shown in (
                ("nodes, peak", number(o.peak_nodes), pub.peak_nodes, number),
                ("nodes, average", number(o.avg_nodes), pub.avg_nodes, number),
                ("node-hours", number(o.node_hours), None, number),
                ("GPU-hours", number(report.gpu_hours), None, number),
                ("cost", usd(o.cost_usd), pub.cost_usd, usd),
                (revenue, usd(report.theoretical_revenue_usd), pub.revenue_usd, usd),
                (margin, percent(report.theoretical_margin), pub.margin,
                 lambda ratio: f"{number(ratio * 100)}%"))]


def render_report(report: Report, *, hours: bool, charts: Sequence[str] = ()) -> str:
    rows = [["", "this day", "published" if report.published else ""],
            *figures(report, report.published, "theoretical revenue", "  margin"),
            ["revenue as billed", usd(report.revenue_usd), ""],
            ["  margin", percent(report.margin), ""]]
    version = f" (version {report.prices.version})" if report.prices.version else ""
    lines = [
        f"window: {window_line(report)}",
        f"prices: {report.prices.source or 'price table'}{version}",
        f"GPUs: {report.gpus_per_node} per node at {usd(report.usd_per_gpu_hour, 2)}/GPU-hour",
        "", *table(rows, [False, True, True]),
        "  (theoretical: every token at standard prices; as billed: time-of-day tiers applied)",
        "", f"tokens: {tokens_line(report.tokens)}",
        *(f"revenue as billed, {model}: {usd(v)}" for model, v in report.revenue_by_model.items()),
        *(f"revenue as billed, {tier} tier: {usd(v)} on {report.tokens_by_tier[tier].total:,} "
          "tokens" for tier, v in report.revenue_by_tier.items()),
        *(f"{phase}: {number(p.node_hours)} node-hours, {number(p.avg_nodes)} nodes on average "
          f"(peak {number(p.peak_nodes)}), cost {usd(p.cost_usd)}"
          for phase, p in report.phases.items()),
    ]
    if hours:
        lines += ["", f"per hour ({report.window.tz}):", *hour_table(report)]
    return "\n".join(lines + _notes_and_charts(report.notes, charts))


def hour_table(report: Report, extra: Sequence[Sequence[str]] = ()) -> list[str]:
    """One row per hour; `extra` adds columns (its first row is their header)."""
    rows = [["hour", "avg nodes", "peak", "cost", "revenue", "theoretical", "margin"]]
    for row in report.hours:
        o = row.occupied
        rows.append([row.label, number(o.avg_nodes), number(o.peak_nodes), usd(o.cost_usd),
                     usd(row.revenue_usd), usd(row.theoretical_revenue_usd),
                     percent(row.margin).split(" ")[0]])  # the whole percent, or "n/a"
    rows = [[*row, *more] for row, more in zip(rows, extra, strict=True)] if extra else rows
    return ["  " + line for line in table(rows)]


def render_reproduction(rep: Reproduction, source: str, charts: Sequence[str] = ()) -> str:
    report, pub, o = rep.report, rep.published, rep.report.occupied
    vs, from_published = rep.revenue_vs_published, rep.margin_from_published_revenue
    remarks = [
        "", f"{number(o.node_hours)} node-hours / {_span(report)} h", "",
        f"x {usd(report.usd_per_gpu_hour, 2)}/GPU-hour",
        "" if pub.cost_usd is None else "exact" if o.cost_usd == pub.cost_usd
        else f"differs by {usd(o.cost_usd - pub.cost_usd)}",
        "" if vs is None else f"{money.signed_percent(vs)} vs published",
        "" if from_published is None
        else f"published revenue / our cost - 1 = {percent(from_published)}",
    ]
    rows = [["", "reproduced", "published", ""]] + [
        [*row, remark] for row, remark in zip(
            figures(report, pub, f"theoretical revenue ({rep.billed_as})", "margin"), remarks,
            strict=True)]
    variants = [["model", "off-peak discount", "revenue", "margin"]] + [
        [v.model, "applied" if v.off_peak_discount else "none", usd(v.revenue_usd),
         percent(v.margin)] for v in rep.variants]
    share = money.div(rep.tiered_node_hours * 100, o.node_hours) if o.node_hours else Decimal(0)
    lines = [
        f"DeepSeek V3/R1 inference, one day: {window_line(report)}",
        f"reference: {source}",
        "", *table(rows, [False, True, True, False]), "",
        "The published token counts are rounded (608B input, 342B cache hits, 168B output): at",
        f"{rep.billed_as} list prices they give {usd(rep.revenue_usd)}; the published figure "
        "used the unrounded counts.",
        f"tokens: {tokens_line(report.tokens)}",
        "",
        "Same day, other billing (the article: real revenue is lower, V3 being cheaper than R1",
        "and off-peak hours discounted):",
        *("  " + line for line in table(variants, [False, False, True, True])),
        "", f"Discount window ({'; '.join(rep.discount_windows) or 'none'}):",
        f"  {number(rep.tiered_node_hours)} of {number(o.node_hours)} node-hours "
        f"({number(share)}%) and {rep.tiered_tokens.total:,} of {report.tokens.total:,} "
        "tokens fall in it.",
    ]
    return "\n".join(lines + _notes_and_charts(report.notes, charts, label="assumption"))


def render_capacity(plan: CapacityPlan, charts: Sequence[str] = ()) -> str:
    a, fluid, report, tokens = plan.assumptions, plan.fluid, plan.report, plan.tokens
    seconds, vs, o = report.window.seconds, plan.fluid_vs_observed, report.occupied
    decode_rate = number(a.throughput.decode_output_tok_per_s)
    rows = [
        ["node-hours", number(o.node_hours)],
        ["nodes, average", number(o.avg_nodes)],
        ["nodes, peak", number(o.peak_nodes)],
        ["cost", f"{usd(o.cost_usd)}  ({a.gpus_per_node} GPUs/node x "
                 f"{usd(report.usd_per_gpu_hour, 2)}/GPU-hour)"],
        ["revenue as billed", f"{usd(report.revenue_usd)}  margin {percent(report.margin)}"],
        ["theoretical revenue",
         f"{usd(report.theoretical_revenue_usd)}  margin {percent(report.theoretical_margin)}"],
    ]
    planned = [["prefill", "decode"], *([number(n) for n in hour] for hour in plan.planned_nodes)]
    lines = [
        f"capacity model: {window_line(report)}",
        f"tokens: {tokens_line(tokens)}",
        "", "average nodes needed (nodes follow traffic exactly):",
        f"  prefill: {tokens.input_total:,} input tok / ({number(fluid.prefill_rate)} tok/s/node "
        f"x {seconds:,} s) = {number(fluid.prefill)} nodes",
        f"  decode:  {tokens.output:,} output tok / ({decode_rate} tok/s/node x {seconds:,} s) "
        f"= {number(fluid.decode)} nodes",
        f"  total:   {number(fluid.total)} nodes; the usage schedule averages "
        f"{number(plan.observed_avg_nodes)}"
        + ("" if vs is None else f" ({money.signed_percent(vs)})"),
        "  (prefill rate taken as independent of the cache hit rate; --prefill-hit-cost below 1 "
        "makes cache hits cheaper to prefill)" if a.prefill_hit_cost == 1 else
        f"  (a cache hit costs {money.plain(a.prefill_hit_cost)} of a miss in prefill; rate "
        f"measured at {number(a.reference_hit_fraction * 100)}% hits)",
        "", f"hourly plan: whole units of {a.deployment.prefill_unit_nodes} prefill / "
        f"{a.deployment.decode_unit_nodes} decode nodes, at least {a.min_units} unit(s) each; "
        f"traffic curve: {plan.curve_source}",
        *("  " + line for line in table(rows, [False, False])),
        "", f"per hour ({report.window.tz}):",
        *hour_table(report, planned),
    ]
    return "\n".join(lines + _notes_and_charts(report.notes, charts))


def _span(report: Report) -> str:
    return number(money.hours(report.window.seconds))


def _notes_and_charts(notes: Sequence[str], charts: Sequence[str], label: str = "note"
                      ) -> list[str]:
    lines = ["", *(f"{label}: {note}" for note in notes)] if notes else []
    return lines + (["", "charts: " + ", ".join(charts)] if charts else [])
