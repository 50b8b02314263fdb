"""`epserve economics report|reproduce|capacity`: the thin shell over the pure core.

Prices: `--prices FILE` wins, else the usage file's own `pricing_usd_per_million_tokens` block,
else the versioned default table (services/economics/data/prices.yaml).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

from services.common.errors import CliError
from services.economics import render
from services.economics.billing import SPREAD_BY_NODES, SPREADS
from services.economics.capacity import (
    CapacityAssumptions,
    hit_fraction,
    integer_weights,
    with_cache_hit_rate,
)
from services.economics.capacity_plan import default_curve, hour_slots, plan_capacity
from services.economics.files import (
    REFERENCE_DAY,
    data_path,
    load_document,
    load_prices,
    load_usage,
)
from services.economics.jsonview import capacity_json, report_json, reproduction_json
from services.economics.prices import PriceTable, UnknownModel
from services.economics.report import compute_report
from services.economics.reproduce import reproduce
from services.economics.tokens import TokenCounts
from services.economics.usage import DayUsage, Deployment, NodeThroughput


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "economics", help="cost, revenue and margin of a day of serving (report|reproduce|capacity)"
    )
    sub = parser.add_subparsers(dest="economics_command", required=True)

    report = sub.add_parser(
        "report", help="cost / revenue / margin table and charts for a usage file"
    )
    report.add_argument("--usage", type=Path, required=True, help="usage file (JSON or YAML)")
    _common(report, chart_default=Path("."))
    report.add_argument(
        "--usd-per-gpu-hour", type=_decimal_arg, help="override hardware.usd_per_gpu_hour"
    )
    report.add_argument(
        "--hours", action="store_true", help="print per-hour rows even for day totals"
    )
    report.set_defaults(func=run_report)

    repro = sub.add_parser(
        "reproduce", help="reproduce DeepSeek's published day (cost $87,072, 545%%)"
    )
    repro.add_argument(
        "--reference", type=Path, default=None, help="reference usage file (default: shipped copy)"
    )
    _common(repro, chart_default=None)
    repro.set_defaults(func=run_reproduce)

    cap = sub.add_parser(
        "capacity", help="nodes, cost and margin from per-node throughput (what-if)"
    )
    cap.add_argument(
        "--usage", type=Path, default=None, help="usage file (default: DeepSeek's day)"
    )
    _common(cap, chart_default=None)
    cap.add_argument(
        "--prefill-tok-per-s",
        type=_decimal_arg,
        help="prefill input tok/s per node, cache hits included",
    )
    cap.add_argument("--decode-tok-per-s", type=_decimal_arg, help="decode output tok/s per node")
    cap.add_argument(
        "--cache-hit-rate",
        type=_decimal_arg,
        help="fraction of input tokens that hit the cache (0-1)",
    )
    cap.add_argument(
        "--prefill-hit-cost",
        type=_decimal_arg,
        default=Decimal(1),
        help="prefill work of a cache hit relative to a miss (0-1, default 1: rate independent of hits)",
    )
    cap.add_argument("--input-tokens", type=int, help="override the day's input tokens")
    cap.add_argument("--output-tokens", type=int, help="override the day's output tokens")
    cap.add_argument(
        "--usd-per-gpu-hour", type=_decimal_arg, help="override hardware.usd_per_gpu_hour"
    )
    cap.add_argument(
        "--hourly-curve", type=Path, help="JSON/YAML list of hourly weights from the window start"
    )
    cap.add_argument(
        "--prefill-unit-nodes", type=int, help="nodes per prefill unit (default from usage: 4)"
    )
    cap.add_argument(
        "--decode-unit-nodes", type=int, help="nodes per decode unit (default from usage: 18)"
    )
    cap.add_argument(
        "--min-units", type=int, default=1, help="minimum units per phase each hour (default 1)"
    )
    cap.set_defaults(func=run_capacity)


def _common(parser: argparse.ArgumentParser, *, chart_default: Path | None) -> None:
    parser.add_argument(
        "--prices",
        type=Path,
        help="price table (YAML/JSON) overriding the usage file's and the default",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (fields in docs/economics.md)"
    )
    parser.add_argument(
        "--spread",
        choices=SPREADS,
        default=SPREAD_BY_NODES,
        help="how day totals are shared over hours: by node schedule (default) or uniformly",
    )
    where = "current directory" if chart_default else "no charts unless given"
    parser.add_argument(
        "--chart-dir", type=Path, default=chart_default, help=f"write PNG charts here ({where})"
    )
    if chart_default is not None:
        parser.add_argument("--no-charts", action="store_true", help="do not write charts")


# ---- commands ----


def run_report(args: argparse.Namespace) -> int:
    usage = load_usage(args.usage)
    if args.usd_per_gpu_hour is not None:
        usage = replace(usage, usd_per_gpu_hour=args.usd_per_gpu_hour)
    prices = choose_prices(args.prices, usage)
    report = compute_report(usage, prices, spread=args.spread)
    charts = _charts(args, report, usage, "economics", "Day")
    if args.json:
        _print_json(report_json(report, charts))
    else:
        print(render.render_report(report, hours=usage.traffic_timed or args.hours, charts=charts))
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    source = args.reference or data_path(REFERENCE_DAY)
    usage = load_usage(source)
    prices = choose_prices(args.prices, usage)
    try:
        result = reproduce(usage, prices, spread=args.spread)
    except ValueError as exc:
        raise CliError(f"reference {source}: {exc}") from None
    charts = _charts(args, result.report, usage, "deepseek_day", "DeepSeek day")
    if args.json:
        _print_json(reproduction_json(result, charts))
    else:
        print(render.render_reproduction(result, str(source), charts))
    return 0


def run_capacity(args: argparse.Namespace) -> int:
    usage = load_usage(args.usage or data_path(REFERENCE_DAY))
    prices = choose_prices(args.prices, usage)
    totals = _capacity_totals(args, usage)
    assumptions = _assumptions(args, usage)
    if args.hourly_curve:
        curve, source = (
            _load_curve(args.hourly_curve, len(hour_slots(usage))),
            str(args.hourly_curve),
        )
    else:
        curve, source = default_curve(usage, prices)
    try:
        plan = plan_capacity(
            usage,
            prices,
            assumptions,
            totals=totals,
            curve=curve,
            curve_source=source,
            usd_per_gpu_hour=args.usd_per_gpu_hour
            if args.usd_per_gpu_hour is not None
            else usage.usd_per_gpu_hour,
        )
    except (ValueError, UnknownModel) as exc:
        raise CliError(str(exc)) from None
    charts = _charts(args, plan.report, plan.usage, "capacity", "Capacity plan")
    if args.json:
        _print_json(capacity_json(plan, charts))
    else:
        print(render.render_capacity(plan, charts))
    return 0


# ---- helpers ----


def choose_prices(path: Path | None, usage: DayUsage) -> PriceTable:
    if path is not None:
        prices = load_prices(path)
    elif usage.prices is not None:
        prices = usage.prices
    else:
        prices = load_prices(None)
    for model in usage.models:
        if model not in prices.models:
            where = usage.model_fields.get(model, "model")
            raise CliError(
                f"{where}: no price for model {model!r} in {prices.source or 'the price table'} "
                f"(it prices {', '.join(sorted(prices.models))})"
            )
    return prices


def _capacity_totals(args: argparse.Namespace, usage: DayUsage) -> dict[str, TokenCounts]:
    totals = {model: usage.tokens_of(model) for model in usage.models}
    if args.input_tokens is not None or args.output_tokens is not None:
        if len(totals) != 1:
            raise CliError("--input-tokens/--output-tokens need a usage file with one model")
        ((model, tokens),) = totals.items()
        input_total = tokens.input_total if args.input_tokens is None else args.input_tokens
        output = tokens.output if args.output_tokens is None else args.output_tokens
        if input_total < 0 or output < 0:
            raise CliError("--input-tokens/--output-tokens must be >= 0")
        rate = hit_fraction(tokens)
        totals = {model: with_cache_hit_rate(TokenCounts(0, input_total, output), rate)}
    if args.cache_hit_rate is not None:
        if not Decimal(0) <= args.cache_hit_rate <= Decimal(1):
            raise CliError(f"--cache-hit-rate must be within 0 and 1, got {args.cache_hit_rate}")
        totals = {m: with_cache_hit_rate(t, args.cache_hit_rate) for m, t in totals.items()}
    return totals


def _assumptions(args: argparse.Namespace, usage: DayUsage) -> CapacityAssumptions:
    measured, units = usage.throughput, usage.deployment
    prefill = _pick(args.prefill_tok_per_s, measured and measured.prefill_input_tok_per_s)
    decode = _pick(args.decode_tok_per_s, measured and measured.decode_output_tok_per_s)
    if prefill is None or decode is None:
        raise CliError(
            "per-node throughput unknown: give --prefill-tok-per-s and --decode-tok-per-s "
            "(or throughput_per_node in the usage file)"
        )
    prefill_unit = _pick(args.prefill_unit_nodes, units and units.prefill_unit_nodes)
    decode_unit = _pick(args.decode_unit_nodes, units and units.decode_unit_nodes)
    if prefill_unit is None or decode_unit is None:
        raise CliError(
            "deployment unit sizes unknown: give --prefill-unit-nodes and --decode-unit-nodes "
            "(or deployment.prefill_unit.nodes / decode_unit.nodes in the usage file)"
        )
    try:
        return CapacityAssumptions(
            throughput=NodeThroughput(prefill, decode),
            deployment=Deployment(prefill_unit, decode_unit),
            gpus_per_node=usage.schedule.gpus_per_node,
            min_units=args.min_units,
            prefill_hit_cost=args.prefill_hit_cost,
            reference_hit_fraction=hit_fraction(usage.tokens),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _pick(flag, fallback):
    """The flag when given, else the usage file's value (None when it has none)."""
    return flag if flag is not None else (fallback or None)


def _load_curve(path: Path, hours: int) -> list[int]:
    doc = load_document(path, "hourly curve")
    values = doc.get("weights") if isinstance(doc, dict) else doc
    if not isinstance(values, list) or not values:
        raise CliError(f"hourly curve {path}: weights: must be a non-empty list of numbers")
    if len(values) != hours:
        raise CliError(
            f"hourly curve {path}: weights: has {len(values)} values, the window has {hours} hours"
        )
    weights = []
    for i, value in enumerate(values):
        try:
            number = Decimal(str(value)) if not isinstance(value, bool) else Decimal("NaN")
        except InvalidOperation:
            number = Decimal("NaN")
        if not number.is_finite() or number < 0:
            raise CliError(
                f"hourly curve {path}: weights[{i}]: must be a number >= 0, got {value!r}"
            )
        weights.append(number)
    if not any(weights):
        raise CliError(f"hourly curve {path}: weights: all zero")
    return integer_weights(weights)


def _charts(args, report, usage: DayUsage, prefix: str, title: str) -> list[str]:
    if args.chart_dir is None or getattr(args, "no_charts", False):
        return []
    from services.economics.charts import write_charts  # matplotlib only when charts are drawn

    try:
        paths = write_charts(report, usage.schedule, args.chart_dir, prefix=prefix, title=title)
    except OSError as exc:
        raise CliError(str(exc)) from None
    return [str(p) for p in paths]


def _decimal_arg(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


def _print_json(doc: dict) -> None:
    print(json.dumps(doc, indent=2))
