"""Reproduce DeepSeek's published day (pure): cost, theoretical revenue, margin, and what the
same day earns at the other models' list prices and with the off-peak discount applied."""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

from services.economics import money
from services.economics.prices import STANDARD_TIER, PriceTable, Tier
from services.economics.report import SPREAD_BY_NODES, Report, compute_report, cut_points
from services.economics.tokens import TokenCounts
from services.economics.usage import DayUsage, Published


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
    variants: tuple[Variant, ...]
    published: Published
    tiered_node_hours: Decimal  # node-hours inside a discount tier
    tiered_tokens: TokenCounts  # tokens billed under a discount tier (after spreading)
    discount_windows: tuple[str, ...]  # "off_peak 16:30-00:30 UTC = 00:30-08:30 UTC+08:00"

    @property
    def revenue_usd(self) -> Decimal:
        """DeepSeek's theoretical revenue: every token at `billed_as` standard prices."""
        return self.report.theoretical_revenue_usd

    @property
    def margin(self) -> Decimal | None:
        return self.report.theoretical_margin

    @property
    def revenue_vs_published(self) -> Decimal | None:
        return money.relative_difference(self.revenue_usd, self.published.revenue_usd)

    @property
    def margin_from_published_revenue(self) -> Decimal | None:
        revenue = self.published.revenue_usd
        return None if revenue is None else money.margin(revenue, self.report.cost_usd)


def reproduce(usage: DayUsage, prices: PriceTable, spread: str = SPREAD_BY_NODES) -> Reproduction:
    if len(usage.models) != 1:
        raise ValueError(
            f"reproduction expects traffic billed as one model, got {list(usage.models)}")
    billed_as = usage.models[0]
    reports = {model: compute_report(_billed_as(usage, model), prices, spread=spread)
               for model in [billed_as, *(m for m in sorted(prices.models) if m != billed_as)]}
    variants = tuple(
        Variant(model, discounted, *((r.revenue_usd, r.margin) if discounted
                                     else (r.theoretical_revenue_usd, r.theoretical_margin)))
        for model, r in reports.items() for discounted in (False, True)
        if not discounted or prices.tiers)
    edges = cut_points(usage, prices)
    tiered = sum(usage.schedule.gpu_seconds(a, b) for a, b in zip(edges, edges[1:], strict=False)
                 if prices.tier_at(usage.window.at(a)) is not None)
    main = reports[billed_as]
    return Reproduction(
        report=main, billed_as=billed_as, variants=variants,
        published=usage.published or Published(),
        tiered_node_hours=money.div(money.hours(tiered), usage.schedule.gpus_per_node),
        tiered_tokens=TokenCounts.sum(t for tier, t in main.tokens_by_tier.items()
                                      if tier != STANDARD_TIER),
        discount_windows=tuple(_describe(tier, usage) for tier in prices.tiers))


def _billed_as(usage: DayUsage, model: str) -> DayUsage:
    return replace(usage, traffic=tuple(replace(b, model=model) for b in usage.traffic))


def _describe(tier: Tier, usage: DayUsage) -> str:
    def hhmm(seconds: int) -> str:
        return f"{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}"

    shift = int((usage.window.tz.utcoffset(None) - tier.tz.utcoffset(None)).total_seconds())
    local = f" = {hhmm(tier.start + shift)}-{hhmm(tier.end + shift)} {usage.window.tz}"
    return f"{tier.name} {hhmm(tier.start)}-{hhmm(tier.end)} {tier.tz}" + (local if shift else "")
