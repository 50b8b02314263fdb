"""Reproduce DeepSeek's published day (pure): cost, theoretical revenue, margin, and what the
same day earns at the other models' list prices and with the off-peak discount applied.

The published day (data/deepseek_day6.json) keeps DeepSeek's shapes, which only
`reference_usage` reads: day totals billed as one model (`tokens`, `published_results.billed_as`),
the node schedule in UTC+8 (`node_schedule_utc8`) and prices as {MODEL: prices, off_peak_<zone>:
{from, to, MODEL: prices}}. It rewrites them into the usage file's schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import timedelta, timezone
from decimal import Decimal
from typing import Any

from services.economics import money
from services.economics.money import TokenCounts
from services.economics.prices import EMBEDDED_KEY, STANDARD_TIER, PriceTable, Tier
from services.economics.report import SPREAD_BY_NODES, Report, compute_report, cut_points
from services.economics.spec import DataError, Obj, count, list_of, map_of, mapping, text
from services.economics.usage import REPLACED, DayUsage, Published, parse_usage
from services.economics.window import usage_window

UTC8 = timezone(timedelta(hours=8))  # DeepSeek's clock, that of node_schedule_utc8
REFERENCE = Obj({  # the fields reference_usage rewrites; the others are a usage file's
    "window": usage_window,
    "node_schedule_utc8": list_of(mapping),
    "tokens": Obj({"input_total": count(), "input_cache_hit": count(), "output_total": count()}),
    "published_results": Obj({"billed_as": text}),
    EMBEDDED_KEY: map_of(mapping),
})


def reference_usage(doc: Any) -> DayUsage:
    """DeepSeek's published day as a day of usage (its tokens day totals, spread when billed).
    An error names the field as it is in the reference (`node_schedule_utc8[3].to`)."""
    ref = REFERENCE(doc, "")
    prices, model, tokens = ref[EMBEDDED_KEY], ref["published_results"]["billed_as"], ref["tokens"]
    hit, total = tokens["input_cache_hit"], tokens["input_total"]
    if hit > total:
        raise DataError("tokens.input_cache_hit", f"exceeds input_total ({total})")
    # The window in UTC+8, so that the schedule's clock times are read in DeepSeek's clock.
    start, end = (t.astimezone(UTC8).isoformat() for t in (ref["window"].start, ref["window"].end))
    tiers = [key for key in prices if key.startswith("off_peak")]
    usage = {
        **{key: value for key, value in doc.items() if key not in REPLACED},
        "window": {"timezone": "UTC+8", "from": start, "to": end},
        "node_schedule": ref["node_schedule_utc8"],
        "hourly_tokens": [{"from": start, "to": end, "model": model, "input_cache_hit": hit,
                           "input_cache_miss": total - hit,
                           "output_total": tokens["output_total"]}],
        EMBEDDED_KEY: {  # off_peak_utc: {from, to, MODEL: prices}: a tier named off_peak, in UTC
            "version": "embedded", "models": {k: v for k, v in prices.items() if k not in tiers},
            "tiers": [{"name": "off_peak", "from": prices[k].get("from"), "to": prices[k].get("to"),
                       "timezone": (k[len("off_peak"):].lstrip("_") or "utc").upper(),
                       "models": {m: p for m, p in prices[k].items() if m not in ("from", "to")}}
                      for k in tiers]},
    }
    try:
        day = parse_usage(usage)
    except DataError as exc:
        raise DataError(_reference_path(exc.path, tiers), exc.problem) from None
    return replace(day, traffic_timed=False, model_fields={model: "published_results.billed_as"})


def _reference_path(path: str, tiers: list[str]) -> str:
    """A field of the rewritten document where it is in the reference."""
    path = re.sub(r"^node_schedule\b", "node_schedule_utc8", path)
    path = re.sub(rf"^{EMBEDDED_KEY}\.models\b", EMBEDDED_KEY, path)
    return re.sub(rf"^{EMBEDDED_KEY}\.tiers\[(\d+)\](\.models)?",
                  lambda m: f"{EMBEDDED_KEY}.{tiers[int(m[1])]}", path)


@dataclass(frozen=True)
class Variant:
    model: str
    off_peak_discount: bool  # True: tiers applied by start time; False: standard prices only
    revenue_usd: Decimal
    margin: Decimal | None


@dataclass(frozen=True)
class Reproduction:
    report: Report  # the day billed as published (`billed_as`)
    billed_as: str
    revenue_usd: Decimal  # DeepSeek's theoretical revenue: every token at list prices
    margin: Decimal | None
    published: Published
    revenue_vs_published: Decimal | None
    margin_from_published_revenue: Decimal | None
    variants: tuple[Variant, ...]
    tiered_node_hours: Decimal  # node-hours inside a discount tier
    tiered_tokens: TokenCounts  # tokens billed under a discount tier (after spreading)
    discount_windows: tuple[str, ...]  # "off_peak 16:30-00:30 UTC = 00:30-08:30 UTC+08:00"


def reproduce(usage: DayUsage, prices: PriceTable, spread: str = SPREAD_BY_NODES) -> Reproduction:
    if len(usage.models) != 1:
        raise ValueError(
            f"reproduction expects traffic billed as one model, got {list(usage.models)}")
    billed_as, published = usage.models[0], usage.published or Published()
    reports = {}  # the same day billed as each model, billed_as first
    for model in [billed_as, *(m for m in sorted(prices.models) if m != billed_as)]:
        traffic = tuple(replace(bucket, model=model) for bucket in usage.traffic)
        reports[model] = compute_report(replace(usage, traffic=traffic), prices, spread=spread)
    variants = tuple(
        Variant(model, discounted, *((r.revenue_usd, r.margin) if discounted
                                     else (r.theoretical_revenue_usd, r.theoretical_margin)))
        for model, r in reports.items() for discounted in (False, True)
        if not discounted or prices.tiers)
    edges, main = cut_points(usage, prices), reports[billed_as]
    tiered = sum(usage.schedule.gpu_seconds(a, b) for a, b in zip(edges, edges[1:], strict=False)
                 if prices.tier_at(usage.window.at(a)) is not None)
    return Reproduction(
        main, billed_as, main.theoretical_revenue_usd, main.theoretical_margin, published,
        money.relative_difference(main.theoretical_revenue_usd, published.revenue_usd),
        money.margin(published.revenue_usd, main.cost_usd),
        variants, money.div(money.hours(tiered), usage.schedule.gpus_per_node),
        TokenCounts.sum(t for tier, t in main.tokens_by_tier.items() if tier != STANDARD_TIER),
        tuple(_describe(tier, usage) for tier in prices.tiers))


def _describe(tier: Tier, usage: DayUsage) -> str:
    def hhmm(seconds: int) -> str:
        return f"{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}"

    shift = int((usage.window.tz.utcoffset(None) - tier.tz.utcoffset(None)).total_seconds())
    local = f" = {hhmm(tier.start + shift)}-{hhmm(tier.end + shift)} {usage.window.tz}"
    return f"{tier.name} {hhmm(tier.start)}-{hhmm(tier.end)} {tier.tz}" + (local if shift else "")
