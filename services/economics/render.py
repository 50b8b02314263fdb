"""Text views of reports, reproductions and capacity plans (money rounded here, only here)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from services.economics import money
from services.economics.capacity_plan import CapacityPlan
from services.economics.report import Report
from services.economics.reproduce import Reproduction
from services.economics.tokens import TokenCounts


def table(rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = right or [i > 0 for i in range(len(widths))]
    lines = []
    for row in rows:
        cells = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def window_line(report: Report) -> str:
    w = report.window
    start, end = w.start.astimezone(w.tz), w.end.astimezone(w.tz)
    span = money.number(money.hours(w.seconds))
    return f"{start:%Y-%m-%d %H:%M} -> {end:%Y-%m-%d %H:%M} ({w.tz}), {span} h"


def tokens_line(tokens: TokenCounts) -> str:
    share = ""
    if tokens.input_total:
        share = f" = {money.number(money.div(tokens.input_cache_hit * 100, tokens.input_total))}%"
    return (
        f"input {tokens.input_total:,} (cache hit {tokens.input_cache_hit:,}{share}, "
        f"miss {tokens.input_cache_miss:,}), output {tokens.output:,}"
    )


def _pub(value: Decimal | None, fmt) -> str:
    return "" if value is None else fmt(value)


def render_report(report: Report, *, hours: bool, charts: Sequence[str] = ()) -> str:
    pub = report.published
    o = report.occupied
    rows = [
        ["", "this day", "published" if pub else ""],
        ["nodes, peak", money.number(o.peak_nodes), _pub(pub and pub.peak_nodes, money.number)],
        ["nodes, average", money.number(o.avg_nodes), _pub(pub and pub.avg_nodes, money.number)],
        ["node-hours", money.number(o.node_hours), ""],
        ["GPU-hours", money.number(report.gpu_hours), ""],
        ["cost", money.usd(o.cost_usd), _pub(pub and pub.cost_usd, money.usd)],
        [
            "theoretical revenue",
            money.usd(report.theoretical_revenue_usd),
            _pub(pub and pub.revenue_usd, money.usd),
        ],
        ["  margin", money.percent(report.theoretical_margin), _pub(pub and pub.margin, _pct)],
        ["revenue as billed", money.usd(report.revenue_usd), ""],
        ["  margin", money.percent(report.margin), ""],
    ]
    lines = [
        f"window: {window_line(report)}",
        f"prices: {report.prices_source or 'price table'}"
        + (f" (version {report.prices_version})" if report.prices_version else ""),
        f"GPUs: {report.gpus_per_node} per node at {money.usd(report.usd_per_gpu_hour, 2)}/GPU-hour",
        "",
        *table(rows, [False, True, True]),
        "  (theoretical: every token at standard prices; as billed: time-of-day tiers applied)",
        "",
        f"tokens: {tokens_line(report.tokens)}",
    ]
    for model, usd in report.revenue_by_model.items():
        lines.append(f"revenue as billed, {model}: {money.usd(usd)}")
    for tier, usd in report.revenue_by_tier.items():
        lines.append(
            f"revenue as billed, {tier} tier: {money.usd(usd)} on {report.tokens_by_tier[tier].total:,} tokens"
        )
    for phase, occ in report.phases.items():
        lines.append(
            f"{phase}: {money.number(occ.node_hours)} node-hours, {money.number(occ.avg_nodes)} "
            f"nodes on average (peak {money.number(occ.peak_nodes)}), cost {money.usd(occ.cost_usd)}"
        )
    if hours:
        lines += ["", f"per hour ({report.window.tz}):", *hour_table(report)]
    lines += _notes_and_charts(report.notes, charts)
    return "\n".join(lines)


def hour_table(report: Report, extra: Sequence[Sequence[str]] | None = None) -> list[str]:
    header = ["hour", "avg nodes", "peak", "cost", "revenue", "theoretical", "margin"]
    rows = [header + (list(extra[0]) if extra else [])]
    for k, row in enumerate(report.hours):
        occ = row.occupied
        cells = [
            row.label,
            money.number(occ.avg_nodes),
            money.number(occ.peak_nodes),
            money.usd(occ.cost_usd),
            money.usd(row.revenue_usd),
            money.usd(row.theoretical_revenue_usd),
            money.percent(row.margin).split(" ")[0] if row.margin is not None else "n/a",
        ]
        rows.append(cells + (list(extra[k + 1]) if extra else []))
    return ["  " + line for line in table(rows)]


def render_reproduction(rep: Reproduction, source: str, charts: Sequence[str] = ()) -> str:
    report, pub = rep.report, rep.published
    o = report.occupied
    rev_diff = rep.revenue_vs_published
    cost_note = ""
    if pub.cost_usd is not None:
        cost_note = (
            "exact"
            if o.cost_usd == pub.cost_usd
            else f"differs by {money.usd(o.cost_usd - pub.cost_usd)}"
        )
    rows = [
        ["", "reproduced", "published", ""],
        ["nodes, peak", money.number(o.peak_nodes), _pub(pub.peak_nodes, money.number), ""],
        [
            "nodes, average",
            money.number(o.avg_nodes),
            _pub(pub.avg_nodes, money.number),
            f"{money.number(o.node_hours)} node-hours / {money.number(money.hours(report.window.seconds))} h",
        ],
        ["node-hours", money.number(o.node_hours), "", ""],
        [
            "GPU-hours",
            money.number(report.gpu_hours),
            "",
            f"x {money.usd(report.usd_per_gpu_hour, 2)}/GPU-hour",
        ],
        ["cost", money.usd(o.cost_usd), _pub(pub.cost_usd, money.usd), cost_note],
        [
            f"theoretical revenue ({rep.billed_as})",
            money.usd(rep.revenue_usd),
            _pub(pub.revenue_usd, money.usd),
            "" if rev_diff is None else f"{_signed_pct(rev_diff)} vs published",
        ],
        [
            "margin",
            money.percent(rep.margin),
            _pub(pub.margin, _pct),
            ""
            if rep.margin_from_published_revenue is None
            else f"published revenue / our cost - 1 = {money.percent(rep.margin_from_published_revenue)}",
        ],
    ]
    lines = [
        f"DeepSeek V3/R1 inference, one day: {window_line(report)}",
        f"reference: {source}",
        "",
        *table(rows, [False, True, True, False]),
        "",
        "The published token counts are rounded (608B input, 342B cache hits, 168B output): at",
        f"{rep.billed_as} list prices they give {money.usd(rep.revenue_usd)}; the published figure "
        "used the unrounded counts.",
        f"tokens: {tokens_line(report.tokens)}",
        "",
        "Same day, other billing (the article: real revenue is lower, V3 being cheaper than R1",
        "and off-peak hours discounted):",
    ]
    variant_rows = [["model", "off-peak discount", "revenue", "margin"]]
    for v in rep.variants:
        variant_rows.append(
            [
                v.model,
                "applied" if v.off_peak_discount else "none",
                money.usd(v.revenue_usd),
                money.percent(v.margin),
            ]
        )
    lines += ["  " + line for line in table(variant_rows, [False, False, True, True])]
    share = money.div(rep.tiered_node_hours * 100, o.node_hours) if o.node_hours else Decimal(0)
    lines += [
        "",
        f"Discount window ({'; '.join(rep.discount_windows) or 'none'}):",
        f"  {money.number(rep.tiered_node_hours)} of {money.number(o.node_hours)} node-hours "
        f"({money.number(share)}%) and {rep.tiered_tokens.total:,} of {report.tokens.total:,} "
        "tokens fall in it.",
    ]
    lines += _notes_and_charts(report.notes, charts, label="assumption")
    return "\n".join(lines)


def render_capacity(plan: CapacityPlan, charts: Sequence[str] = ()) -> str:
    a, fluid, report = plan.assumptions, plan.fluid, plan.report
    seconds = report.window.seconds
    tokens = plan.tokens
    vs = plan.fluid_vs_observed
    lines = [
        f"capacity model: {window_line(report)}",
        f"tokens: {tokens_line(tokens)}",
        "",
        "average nodes needed (nodes follow traffic exactly):",
        f"  prefill: {tokens.input_total:,} input tok / ({money.number(fluid.prefill_rate)} tok/s/node "
        f"x {seconds:,} s) = {money.number(fluid.prefill, 2)} nodes",
        f"  decode:  {tokens.output:,} output tok / ({money.number(a.throughput.decode_output_tok_per_s)} "
        f"tok/s/node x {seconds:,} s) = {money.number(fluid.decode, 2)} nodes",
        f"  total:   {money.number(fluid.total, 2)} nodes; the usage schedule averages "
        f"{money.number(plan.observed_avg_nodes, 2)}"
        + ("" if vs is None else f" ({_signed_pct(vs)})"),
    ]
    if a.prefill_hit_cost == 1:
        lines.append(
            "  (prefill rate taken as independent of the cache hit rate; --prefill-hit-cost "
            "below 1 makes cache hits cheaper to prefill)"
        )
    else:
        lines.append(
            f"  (a cache hit costs {money.plain(a.prefill_hit_cost)} of a miss in prefill; rate measured "
            f"at {money.number(a.reference_hit_fraction * 100)}% hits)"
        )
    o = report.occupied
    rows = [
        ["node-hours", money.number(o.node_hours)],
        ["nodes, average", money.number(o.avg_nodes)],
        ["nodes, peak", money.number(o.peak_nodes)],
        [
            "cost",
            f"{money.usd(o.cost_usd)}  ({a.gpus_per_node} GPUs/node x "
            f"{money.usd(report.usd_per_gpu_hour, 2)}/GPU-hour)",
        ],
        [
            "revenue as billed",
            f"{money.usd(report.revenue_usd)}  margin {money.percent(report.margin)}",
        ],
        [
            "theoretical revenue",
            f"{money.usd(report.theoretical_revenue_usd)}  margin "
            f"{money.percent(report.theoretical_margin)}",
        ],
    ]
    lines += [
        "",
        f"hourly plan: whole units of {a.deployment.prefill_unit_nodes} prefill / "
        f"{a.deployment.decode_unit_nodes} decode nodes, at least {a.min_units} unit(s) each; "
        f"traffic curve: {plan.curve_source}",
        *["  " + line for line in table(rows, [False, False])],
        "",
        f"per hour ({report.window.tz}):",
        *hour_table(
            report,
            [["prefill", "decode"]]
            + [
                [money.number(h.prefill_nodes), money.number(h.decode_nodes)]
                for h in plan.planned_hours
            ],
        ),
    ]
    lines += _notes_and_charts(report.notes, charts)
    return "\n".join(lines)


def _pct(ratio: Decimal) -> str:
    return f"{money.number(ratio * 100, 2)}%"


def _signed_pct(ratio: Decimal) -> str:
    return f"{'+' if ratio >= 0 else '-'}{money.number(abs(ratio) * 100, 3)}%"


def _notes_and_charts(
    notes: Sequence[str], charts: Sequence[str], label: str = "note"
) -> list[str]:
    lines = []
    if notes:
        lines.append("")
        lines += [f"{label}: {note}" for note in notes]
    if charts:
        lines += ["", "charts: " + ", ".join(charts)]
    return lines
