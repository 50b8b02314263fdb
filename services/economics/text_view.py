"""Text views of reports, reproductions and capacity plans (money is rounded here, only here)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from services.economics import money
from services.economics.capacity import CapacityPlan
from services.economics.money import number, percent, usd
from services.economics.report import Report
from services.economics.reproduce import Reproduction
from services.economics.tokens import TokenCounts


def table(rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    """Columns padded to their widest cell; by default the first left-aligned, others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = right or [i > 0 for i in range(len(widths))]
    return ["  ".join(c.rjust(w) if r else c.ljust(w)
                      for c, w, r in zip(row, widths, right, strict=True)).rstrip() for row in rows]


def window_line(report: Report) -> str:
    w = report.window
    start, end = w.start.astimezone(w.tz), w.end.astimezone(w.tz)
    span = number(money.hours(w.seconds))
    return f"{start:%Y-%m-%d %H:%M} -> {end:%Y-%m-%d %H:%M} ({w.tz}), {span} h"


def tokens_line(tokens: TokenCounts) -> str:
    share = ""
    if tokens.input_total:
        share = f" = {number(money.div(tokens.input_cache_hit * 100, tokens.input_total))}%"
    return (f"input {tokens.input_total:,} (cache hit {tokens.input_cache_hit:,}{share}, "
            f"miss {tokens.input_cache_miss:,}), output {tokens.output:,}")


def render_report(report: Report, *, hours: bool, charts: Sequence[str] = ()) -> str:
    pub, o = report.published, report.occupied
    rows = [
        ["", "this day", "published" if pub else ""],
        ["nodes, peak", number(o.peak_nodes), _shown(pub and pub.peak_nodes, number)],
        ["nodes, average", number(o.avg_nodes), _shown(pub and pub.avg_nodes, number)],
        ["node-hours", number(o.node_hours), ""],
        ["GPU-hours", number(report.gpu_hours), ""],
        ["cost", usd(o.cost_usd), _shown(pub and pub.cost_usd, usd)],
        ["theoretical revenue", usd(report.theoretical_revenue_usd),
         _shown(pub and pub.revenue_usd, usd)],
        ["  margin", percent(report.theoretical_margin), _shown(pub and pub.margin, _ratio)],
        ["revenue as billed", usd(report.revenue_usd), ""],
        ["  margin", percent(report.margin), ""],
    ]
    version = f" (version {report.prices_version})" if report.prices_version else ""
    lines = [
        f"window: {window_line(report)}",
        f"prices: {report.prices_source or 'price table'}{version}",
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
                     percent(row.margin).split(" ")[0] if row.margin is not None else "n/a"])
    rows = [[*row, *more] for row, more in zip(rows, extra, strict=True)] if extra else rows
    return ["  " + line for line in table(rows)]


def render_reproduction(rep: Reproduction, source: str, charts: Sequence[str] = ()) -> str:
    report, pub, o = rep.report, rep.published, rep.report.occupied
    cost_note = "" if pub.cost_usd is None else (
        "exact" if o.cost_usd == pub.cost_usd else f"differs by {usd(o.cost_usd - pub.cost_usd)}")
    vs, from_published = rep.revenue_vs_published, rep.margin_from_published_revenue
    rows = [
        ["", "reproduced", "published", ""],
        ["nodes, peak", number(o.peak_nodes), _shown(pub.peak_nodes, number), ""],
        ["nodes, average", number(o.avg_nodes), _shown(pub.avg_nodes, number),
         f"{number(o.node_hours)} node-hours / {number(money.hours(report.window.seconds))} h"],
        ["node-hours", number(o.node_hours), "", ""],
        ["GPU-hours", number(report.gpu_hours), "",
         f"x {usd(report.usd_per_gpu_hour, 2)}/GPU-hour"],
        ["cost", usd(o.cost_usd), _shown(pub.cost_usd, usd), cost_note],
        [f"theoretical revenue ({rep.billed_as})", usd(rep.revenue_usd),
         _shown(pub.revenue_usd, usd),
         "" if vs is None else f"{money.signed_percent(vs)} vs published"],
        ["margin", percent(rep.margin), _shown(pub.margin, _ratio), "" if from_published is None
         else f"published revenue / our cost - 1 = {percent(from_published)}"],
    ]
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
        "",
        f"Discount window ({'; '.join(rep.discount_windows) or 'none'}):",
        f"  {number(rep.tiered_node_hours)} of {number(o.node_hours)} node-hours "
        f"({number(share)}%) and {rep.tiered_tokens.total:,} of {report.tokens.total:,} "
        "tokens fall in it.",
    ]
    return "\n".join(lines + _notes_and_charts(report.notes, charts, label="assumption"))


def render_capacity(plan: CapacityPlan, charts: Sequence[str] = ()) -> str:
    a, fluid, report, tokens = plan.assumptions, plan.fluid, plan.report, plan.tokens
    seconds, vs, o = report.window.seconds, plan.fluid_vs_observed, report.occupied
    decode_rate = number(a.throughput.decode_output_tok_per_s)
    lines = [
        f"capacity model: {window_line(report)}",
        f"tokens: {tokens_line(tokens)}",
        "",
        "average nodes needed (nodes follow traffic exactly):",
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
    ]
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
    planned = [["prefill", "decode"]] + [[number(h.prefill_nodes), number(h.decode_nodes)]
                                         for h in plan.planned_hours]
    lines += [
        "",
        f"hourly plan: whole units of {a.deployment.prefill_unit_nodes} prefill / "
        f"{a.deployment.decode_unit_nodes} decode nodes, at least {a.min_units} unit(s) each; "
        f"traffic curve: {plan.curve_source}",
        *("  " + line for line in table(rows, [False, False])),
        "",
        f"per hour ({report.window.tz}):",
        *hour_table(report, planned),
    ]
    return "\n".join(lines + _notes_and_charts(report.notes, charts))


def _shown(value: Decimal | None, fmt) -> str:
    """A published figure, or nothing when it was not published."""
    return "" if value is None else fmt(value)


def _ratio(ratio: Decimal) -> str:
    return f"{number(ratio * 100)}%"


def _notes_and_charts(notes: Sequence[str], charts: Sequence[str], label: str = "note"
                      ) -> list[str]:
    lines = ["", *(f"{label}: {note}" for note in notes)] if notes else []
    return lines + (["", "charts: " + ", ".join(charts)] if charts else [])
