"""`epserve economics report|reproduce|capacity|live`: cost, revenue and margin of serving.

The argument parser and the handlers, and printing: the input files are read by
services/economics/files.py (every problem one CliError naming the file and the field), the
package is the pure core they call and views.py renders the results as text and JSON; the PNG
charts are drawn here (matplotlib, imported only when charts are drawn). `live` reads the
running cluster's ledger (services/cli/economics_live.py).

Prices: `--prices FILE` wins, else the usage file's own `pricing_usd_per_million_tokens` table,
else the versioned default (services/economics/data/prices.yaml).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

from services.cli import economics_live
from services.common.errors import CliError
from services.economics import capacity, money, views
from services.economics.files import (  # noqa: F401 - re-exported for the CLI's users
    REFERENCE_DAY,
    data_path,
    load_curve,
    load_document,
    load_prices,
    load_reference,
    load_usage,
)
from services.economics.money import TokenCounts
from services.economics.prices import PriceTable
from services.economics.report import SPREAD_BY_NODES, SPREADS, Report, compute_report
from services.economics.reproduce import reproduce
from services.economics.spec import DataError
from services.economics.usage import DayUsage, Deployment, NodeThroughput, Schedule

GPU_PRICE = "override hardware.usd_per_gpu_hour"


def register(subparsers) -> None:
    parser = subparsers.add_parser("economics", help="cost, revenue and margin of a day of "
                                   "serving (report|reproduce|capacity|live)")
    sub = parser.add_subparsers(dest="economics_command", required=True)

    report = sub.add_parser("report",
                            help="cost / revenue / margin table and charts for a usage file")
    report.add_argument("--usage", type=Path, required=True, help="usage file (JSON or YAML)")
    _common(report, chart_default=Path("."))
    report.add_argument("--usd-per-gpu-hour", type=_decimal_arg, help=GPU_PRICE)
    report.add_argument("--hours", action="store_true",
                        help="print per-hour rows even for day totals")
    report.set_defaults(func=run_report)

    repro = sub.add_parser("reproduce",
                           help="reproduce DeepSeek's published day (cost $87,072, 545%%)")
    repro.add_argument("--reference", type=Path, default=None,
                       help="reference usage file (default: shipped copy)")
    _common(repro, chart_default=None)
    repro.set_defaults(func=run_reproduce)

    cap = sub.add_parser("capacity",
                         help="nodes, cost and margin from per-node throughput (what-if)")
    cap.add_argument("--usage", type=Path, help="usage file (default: DeepSeek's day)")
    _common(cap, chart_default=None)
    for flag, kind, default, text in (
        ("--prefill-tok-per-s", _decimal_arg, None,
         "prefill input tok/s per node, cache hits included"),
        ("--decode-tok-per-s", _decimal_arg, None, "decode output tok/s per node"),
        ("--cache-hit-rate", _decimal_arg, None,
         "fraction of input tokens that hit the cache (0-1)"),
        ("--prefill-hit-cost", _decimal_arg, Decimal(1), "prefill work of a cache hit relative to "
         "a miss (0-1, default 1: rate independent of hits)"),
        ("--input-tokens", int, None, "override the day's input tokens"),
        ("--output-tokens", int, None, "override the day's output tokens"),
        ("--usd-per-gpu-hour", _decimal_arg, None, GPU_PRICE),
        ("--hourly-curve", Path, None, "JSON/YAML list of hourly weights from the window start"),
        ("--prefill-unit-nodes", int, None, "nodes per prefill unit (default from usage: 4)"),
        ("--decode-unit-nodes", int, None, "nodes per decode unit (default from usage: 18)"),
        ("--min-units", int, 1, "minimum units per phase each hour (default 1)"),
    ):
        cap.add_argument(flag, type=kind, default=default, help=text)
    cap.set_defaults(func=run_capacity)
    economics_live.register(sub, _common)


def _common(parser: argparse.ArgumentParser, *, chart_default: Path | None) -> None:
    parser.add_argument("--prices", type=Path,
                        help="price table (YAML/JSON) overriding the usage file's and the default")
    parser.add_argument("--json", action="store_true",
                        help="print JSON (fields in docs/economics.md)")
    parser.add_argument("--spread", choices=SPREADS, default=SPREAD_BY_NODES, help=(
        "how day totals are shared over hours: by node schedule (default) or uniformly"))
    where = "current directory" if chart_default else "no charts unless given"
    parser.add_argument("--chart-dir", type=Path, default=chart_default,
                        help=f"write PNG charts here ({where})")
    if chart_default is not None:
        parser.add_argument("--no-charts", action="store_true", help="do not write charts")


def run_report(args: argparse.Namespace) -> int:
    usage = load_usage(args.usage)
    if args.usd_per_gpu_hour is not None:
        usage = replace(usage, usd_per_gpu_hour=args.usd_per_gpu_hour)
    report = compute_report(usage, choose_prices(args.prices, usage), spread=args.spread)
    charts = _charts(args, report, usage, "economics", "Day")
    return _print(args, views.report_json(report, charts), lambda: views.render_report(
        report, hours=usage.traffic_timed or args.hours, charts=charts))


def run_reproduce(args: argparse.Namespace) -> int:
    source = args.reference or data_path(REFERENCE_DAY)
    usage = load_reference(source)
    try:
        result = reproduce(usage, choose_prices(args.prices, usage), spread=args.spread)
    except ValueError as exc:
        raise CliError(f"reference {source}: {exc}") from None
    charts = _charts(args, result.report, usage, "deepseek_day", "DeepSeek day")
    return _print(args, views.reproduction_json(result, charts),
                  lambda: views.render_reproduction(result, str(source), charts))


def run_capacity(args: argparse.Namespace) -> int:
    usage = load_usage(args.usage) if args.usage else load_reference(None)
    prices = choose_prices(args.prices, usage)
    try:
        plan = capacity.plan_capacity(
            usage, prices, _assumptions(args, usage), totals=_capacity_totals(args, usage),
            **_curve(args.hourly_curve, usage, prices),
            usd_per_gpu_hour=usage.usd_per_gpu_hour if args.usd_per_gpu_hour is None
            else args.usd_per_gpu_hour)
    except DataError as exc:  # the traffic curve does not fit the window
        where = args.hourly_curve or "(from the usage file)"
        raise CliError(f"hourly curve {where}: {exc}") from None
    except ValueError as exc:  # impossible assumptions or flags, unknown models
        raise CliError(str(exc)) from None
    charts = _charts(args, plan.report, plan.usage, "capacity", "Capacity plan")
    return _print(args, views.capacity_json(plan, charts),
                  lambda: views.render_capacity(plan, charts))


def choose_prices(path: Path | None, usage: DayUsage) -> PriceTable:
    prices = usage.prices if path is None and usage.prices is not None else load_prices(path)
    for model in usage.models:
        if model not in prices.models:
            raise CliError(f"{usage.model_fields.get(model, 'model')}: no price for model "
                           f"{model!r} in {prices.source or 'the price table'} "
                           f"(it prices {', '.join(sorted(prices.models))})")
    return prices


def _capacity_totals(args: argparse.Namespace, usage: DayUsage) -> dict[str, TokenCounts]:
    totals = {model: TokenCounts.sum(b.tokens for b in usage.traffic if b.model == model)
              for model in usage.models}
    if args.input_tokens is not None or args.output_tokens is not None:
        if len(totals) != 1:
            raise CliError("--input-tokens/--output-tokens need a usage file with one model")
        ((model, tokens),) = totals.items()
        given = (tokens.input_total if args.input_tokens is None else args.input_tokens,
                 tokens.output if args.output_tokens is None else args.output_tokens)
        if min(given) < 0:
            raise CliError("--input-tokens/--output-tokens must be >= 0")
        totals = {model: capacity.with_cache_hit_rate(TokenCounts(0, *given),
                                                      capacity.hit_fraction(tokens))}
    if args.cache_hit_rate is not None and not 0 <= args.cache_hit_rate <= 1:
        raise CliError(f"--cache-hit-rate must be within 0 and 1, got {args.cache_hit_rate}")
    if args.cache_hit_rate is not None:
        totals = {m: capacity.with_cache_hit_rate(t, args.cache_hit_rate)
                  for m, t in totals.items()}
    return totals


def _assumptions(args: argparse.Namespace, usage: DayUsage) -> capacity.CapacityAssumptions:
    """Flags win over the usage file's throughput and deployment units."""
    rates, units = usage.throughput, usage.deployment
    prefill = _pick(args.prefill_tok_per_s, rates and rates.prefill_input_tok_per_s)
    decode = _pick(args.decode_tok_per_s, rates and rates.decode_output_tok_per_s)
    if prefill is None or decode is None:
        raise CliError("per-node throughput unknown: give --prefill-tok-per-s and "
                       "--decode-tok-per-s (or throughput_per_node in the usage file)")
    prefill_unit = _pick(args.prefill_unit_nodes, units and units.prefill_unit_nodes)
    decode_unit = _pick(args.decode_unit_nodes, units and units.decode_unit_nodes)
    if prefill_unit is None or decode_unit is None:
        raise CliError("deployment unit sizes unknown: give --prefill-unit-nodes and "
                       "--decode-unit-nodes (or deployment.prefill_unit.nodes / decode_unit.nodes "
                       "in the usage file)")
    return capacity.CapacityAssumptions(
        NodeThroughput(prefill, decode), Deployment(prefill_unit, decode_unit),
        usage.schedule.gpus_per_node, min_units=args.min_units,
        prefill_hit_cost=args.prefill_hit_cost,
        reference_hit_fraction=capacity.hit_fraction(usage.tokens))


def _pick(flag, fallback):
    """The flag when given, else the usage file's value (None when it has none)."""
    return flag if flag is not None else (fallback or None)


def _curve(path: Path | None, usage: DayUsage, prices: PriceTable) -> dict:
    """The traffic curve from --hourly-curve, or the usage file's own (capacity.default_curve)."""
    if path is None:
        curve, source = capacity.default_curve(usage, prices)
        return {"curve": curve, "curve_source": source}
    return {"curve": capacity.integer_weights(load_curve(path)), "curve_source": str(path)}


def _charts(args: argparse.Namespace, report: Report, usage: DayUsage, prefix: str,
            title: str) -> list[str]:
    """PNG charts in the style of DeepSeek's day-6 figures, written to --chart-dir."""
    if args.chart_dir is None or getattr(args, "no_charts", False):
        return []
    import matplotlib  # only when charts are drawn

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    paths = [args.chart_dir / f"{prefix}_income_cost.png", args.chart_dir / f"{prefix}_nodes.png"]
    try:
        args.chart_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create chart directory {args.chart_dir}: "
                       f"{exc.strerror or exc}") from None
    for draw, path in zip((_income_cost_chart, _node_chart), paths, strict=True):
        fig = draw(plt, report, usage.schedule, title)
        fig.tight_layout()
        try:
            fig.savefig(path, dpi=110)
        except OSError as exc:
            raise CliError(str(exc)) from None
        finally:
            plt.close(fig)
    return [str(p) for p in paths]


def _income_cost_chart(plt, report: Report, schedule: Schedule, title: str):
    """Hourly income bars under the hourly cost line, as in DeepSeek's day-6 figure."""
    hours = report.hours
    # Rates per hour, so that a partial first or last hour is not drawn as a dip.
    series = [[float(value(h)) / ((h.end - h.start) / 3600) for h in hours] for value in (
        lambda h: h.theoretical_revenue_usd, lambda h: h.revenue_usd,
        lambda h: h.occupied.cost_usd)]
    big = max(series[0] + series[2]) >= 10_000
    theoretical, billed, cost = ([v / (1000.0 if big else 1.0) for v in s] for s in series)
    x = list(range(len(hours)))
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.bar(x, theoretical, width=0.8, color="#9ec5f0", label="theoretical income (standard prices)")
    if billed != theoretical:
        ax.bar(x, billed, width=0.5, color="#1f5fa8", label="income as billed (time-of-day tiers)")
    # Hour k's bar is centred on k, so its cost step runs from k - 0.5 to k + 0.5.
    ax.step([k - 0.5 for k in range(len(x) + 1)], [*cost, cost[-1]], where="post",
            color="#f2a900", linewidth=2.5, label="cost")
    ax.set_xticks(x[::2], [h.label for h in hours][::2], rotation=0)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_ylabel("USD per hour (thousands)" if big else "USD per hour")
    ax.set_xlabel(f"hour starting ({report.window.tz})")
    estimated = "" if report.traffic_timed else " - hourly income estimated from day totals"
    ax.set_title(f"{title}: cost and theoretical income{estimated}", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, max([*theoretical, *cost, 0.001]) * 1.25)  # headroom for the legend
    ax.legend(loc="upper center", ncol=3, fontsize=9, frameon=False)
    return fig


def _node_chart(plt, report: Report, schedule: Schedule, title: str):
    """The node count as a step chart, stacked by phase when the schedule names phases."""
    end = report.window.seconds
    times = sorted({0, end, *[t for t in schedule.edges if 0 <= t <= end]})
    xs = [t / 3600 for t in times]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    if schedule.phased:
        total = [0.0] * len(times)
        for phase, colour in (("prefill", "#7fb77e"), ("decode", "#4a7ebb")):
            if phase in schedule.phases:
                top = [b + schedule.gpus_at(t, phase) / schedule.gpus_per_node
                       for b, t in zip(total, times, strict=True)]
                ax.fill_between(xs, total, top, step="post", alpha=0.8, color=colour, label=phase)
                total = top
    else:
        total = [schedule.gpus_at(t) / schedule.gpus_per_node for t in times]
        ax.fill_between(xs, 0, total, step="post", alpha=0.35, color="#4a7ebb")
    ax.step(xs, total, where="post", color="#1f3f6e", linewidth=2, label="nodes")
    ticks = list(range(0, end // 3600 + 1, 2))
    ax.set_xticks(ticks, [report.window.clock(h * 3600) for h in ticks])
    ax.set_xlim(0, end / 3600)
    ax.set_ylim(0, max(total + [1]) * 1.12)
    ax.set_ylabel("nodes")
    ax.set_xlabel(f"time ({report.window.tz})")
    o, number = report.occupied, money.number
    ax.set_title(f"{title}: nodes in service - peak {number(o.peak_nodes)}, average "
                 f"{number(o.avg_nodes)} ({number(o.node_hours)} node-hours)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    return fig


def _print(args: argparse.Namespace, doc: dict, text) -> int:
    print(json.dumps(doc, indent=2) if args.json else text())
    return 0


def _decimal_arg(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value
