"""A day of usage (GPU occupancy, GPU price, traffic to bill) and the usage file's schema.

Times are whole seconds since the window start; occupancy is counted in GPUs (a gap: nothing
ran). A usage file has one shape, the one live metering produces: occupancy intervals
(`node_schedule`) and rows of one model's tokens over a span, normally an hour (`hourly_tokens`,
as metering.aggregate_records folds records). USAGE checks each field's shape, `parse_usage` what
spans fields (spans inside the window, overlaps), naming the field (`node_schedule[3].to`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from itertools import accumulate
from typing import Any

from services.economics import money
from services.economics.money import TokenCounts
from services.economics.prices import EMBEDDED_KEY, PriceTable, parse_price_table
from services.economics.spec import DataError, Obj, Opt, count, list_of, number, one_of, text
from services.economics.window import Window, moment, usage_window

PHASES = ("prefill", "decode")
PHASE = one_of(*PHASES)  # the reader of a `phase` field


@dataclass(frozen=True)
class Occupancy:
    """`gpus` busy in [start, end); `phase` None when the schedule does not say which."""

    start: int
    end: int
    gpus: int
    phase: str | None = None


def check_intervals(intervals: Sequence[Occupancy], name: str) -> None:
    """Every interval names its phase or none does, and intervals of one phase do not overlap.
    A problem names the interval as `name[index]` (`node_schedule[3].from`)."""
    unphased = [k for k, interval in enumerate(intervals) if interval.phase is None]
    if 0 < len(unphased) < len(intervals):
        raise DataError(f"{name}[{unphased[0]}].phase", "name a phase on every entry or on none")
    order = sorted(range(len(intervals)), key=lambda k: (str(intervals[k].phase),
                                                         intervals[k].start))
    for a, b in zip(order, order[1:], strict=False):
        if intervals[a].phase == intervals[b].phase and intervals[b].start < intervals[a].end:
            raise DataError(f"{name}[{b}].from", f"overlaps {name}[{a}] (same phase)")


@dataclass(frozen=True)
class Schedule:
    intervals: tuple[Occupancy, ...]
    gpus_per_node: int

    def __post_init__(self) -> None:
        check_intervals(self.intervals, "intervals")

    @property
    def phased(self) -> bool:
        return any(interval.phase is not None for interval in self.intervals)

    @property
    def phases(self) -> tuple[str | None, ...]:
        present = {interval.phase for interval in self.intervals}
        return tuple(p for p in PHASES if p in present) or (None,)

    @cached_property
    def edges(self) -> tuple[int, ...]:
        return tuple(sorted({t for i in self.intervals for t in (i.start, i.end)}))

    @cached_property
    def _steps(self) -> dict[str | None, tuple[list[int], list[int]]]:
        """Per phase, GPUs on each step [edges[k], edges[k+1]) and GPU-seconds before edges[k]:
        prefix sums, so that a day cut into thousands of pieces integrates fast."""
        steps = {}
        for phase in self.phases:
            delta = dict.fromkeys(self.edges, 0)
            for interval in (i for i in self.intervals if i.phase == phase):
                delta[interval.start] += interval.gpus
                delta[interval.end] -= interval.gpus
            levels = list(accumulate(delta[t] for t in self.edges))
            spans = zip(levels, self.edges, self.edges[1:], strict=False)
            steps[phase] = levels, [0, *accumulate(n * (b - a) for n, a, b in spans)]
        return steps

    def gpus_at(self, t: int, phase: str | None = None) -> int:
        """GPUs busy at second t (all phases when phase is None)."""
        k = bisect_right(self.edges, t) - 1
        return 0 if k < 0 else sum(self._steps[p][0][k] for p in self._select(phase))

    def gpu_seconds(self, start: int, end: int, phase: str | None = None) -> int:
        return sum(self._before(end, p) - self._before(start, p) for p in self._select(phase))

    def peak_gpus(self, start: int, end: int, phase: str | None = None) -> int:
        """Most GPUs busy at once in [start, end) (all phases together when phase is None)."""
        inside = [t for t in self.edges if start < t < end]
        return max(self.gpus_at(t, phase) for t in [start, *inside])

    def nodes(self, gpus: int | Decimal) -> Decimal:
        return money.div(gpus, self.gpus_per_node)

    def _select(self, phase: str | None) -> tuple[str | None, ...]:
        return self.phases if phase is None else (phase,) if phase in self.phases else ()

    def _before(self, t: int, phase: str | None) -> int:
        """GPU-seconds of `phase` before second t."""
        k = bisect_right(self.edges, t) - 1
        levels, before = self._steps[phase]
        return 0 if k < 0 else before[k] + levels[k] * (t - self.edges[k])


@dataclass(frozen=True)
class TrafficBucket:
    """Tokens of one model served in [start, end) (seconds since the window start)."""

    start: int
    end: int
    model: str
    tokens: TokenCounts


@dataclass(frozen=True)
class Published:
    """Figures a source published for the day, shown beside ours; any may be missing."""

    cost_usd: Decimal | None = None
    revenue_usd: Decimal | None = None
    margin: Decimal | None = None
    peak_nodes: Decimal | None = None
    avg_nodes: Decimal | None = None


@dataclass(frozen=True)
class NodeThroughput:
    """Per-node throughput: prefill input tok/s (cache hits included), decode output tok/s."""

    prefill_input_tok_per_s: Decimal
    decode_output_tok_per_s: Decimal


@dataclass(frozen=True)
class Deployment:
    """Nodes are added and removed in whole units (DeepSeek: prefill 4 nodes, decode 18)."""

    prefill_unit_nodes: int
    decode_unit_nodes: int


@dataclass(frozen=True)
class DayUsage:
    window: Window
    schedule: Schedule
    usd_per_gpu_hour: Decimal
    traffic: tuple[TrafficBucket, ...]
    traffic_timed: bool = True  # False: day totals only, spread over the day when billed
    prices: PriceTable | None = None  # the usage file's own price table, if it has one
    published: Published | None = None
    throughput: NodeThroughput | None = None
    deployment: Deployment | None = None
    model_fields: Mapping[str, str] = field(default_factory=dict)  # model -> field naming it
    notes: tuple[str, ...] = ()

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts.sum(bucket.tokens for bucket in self.traffic)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({bucket.model for bucket in self.traffic}))


# ---- the usage file ----

# Shapes only DeepSeek's published day (or earlier versions) used: refused by name, not half read.
REPLACED = {"node_schedule_utc8": "node_schedule", "node_samples": "node_schedule",
            "tokens": "hourly_tokens", "tokens_by_model": "hourly_tokens",
            "billed_as": "the model of each hourly_tokens row"}
ENTRY = Obj({"from": moment, "to": moment, "nodes": count(), "phase": Opt(PHASE)},
            unknown="unknown field; expected from, to, nodes, phase")
COUNTS = ("input_cache_hit", "input_cache_miss", "output_total")  # in TokenCounts' order
ROW = Obj({"from": moment, "to": Opt(moment), "model": text, **dict.fromkeys(COUNTS, count())},
          unknown=f"unknown field; expected from, to, model, {', '.join(COUNTS)}")
FIGURE = Opt(number(None))
USAGE = Obj({
    "window": usage_window,
    "hardware": Obj({"gpus_per_node": count(1), "usd_per_gpu_hour": number()}),
    "node_schedule": list_of(ENTRY, "must list at least one entry"),
    "hourly_tokens": list_of(ROW, "must list at least one row"),
    "published_results": Opt(Obj({"cost_usd_per_day": FIGURE,
                                  "theoretical_revenue_usd_per_day": FIGURE,
                                  "cost_profit_margin": FIGURE})),
    "nodes": Opt(Obj({"peak": FIGURE, "average": FIGURE})),
    "throughput_per_node": Opt(Obj({"prefill_input_tok_per_s_incl_cache_hits": number(1),
                                    "decode_output_tok_per_s": number(1)})),
    "deployment": Opt(Obj({"prefill_unit": Obj({"nodes": count(1)}),
                           "decode_unit": Obj({"nodes": count(1)})})),
    EMBEDDED_KEY: Opt(lambda value, path: parse_price_table(
        value, path, source=f"usage file ({EMBEDDED_KEY})")),
})


def parse_usage(doc: Any) -> DayUsage:
    if isinstance(doc, Mapping) and (old := next((k for k in REPLACED if k in doc), None)):
        raise DataError(old, f"is not read from usage files; give {REPLACED[old]} "
                             "(docs/economics.md)")
    d = USAGE(doc, "")
    window, gpus_per_node = d["window"], d["hardware"]["gpus_per_node"]
    intervals = [Occupancy(*window.span(e["from"], e["to"], f"node_schedule[{i}]"),
                           e["nodes"] * gpus_per_node, e["phase"])
                 for i, e in enumerate(d["node_schedule"])]
    check_intervals(intervals, "node_schedule")
    rows = list(enumerate(d["hourly_tokens"]))
    traffic = tuple(
        TrafficBucket(*window.span(row["from"], row["to"], f"hourly_tokens[{i}]"), row["model"],
                      TokenCounts(*(row[name] for name in COUNTS)))
        for i, row in rows)
    pub, nodes = d["published_results"] or {}, d["nodes"] or {}
    published = Published(pub.get("cost_usd_per_day"), pub.get("theoretical_revenue_usd_per_day"),
                          pub.get("cost_profit_margin"), nodes.get("peak"), nodes.get("average"))
    rates, units = d["throughput_per_node"], d["deployment"]
    return DayUsage(
        window, Schedule(tuple(intervals), gpus_per_node), d["hardware"]["usd_per_gpu_hour"],
        traffic, prices=d[EMBEDDED_KEY],
        published=published if pub or nodes else None,
        throughput=rates and NodeThroughput(*rates.values()),
        deployment=units and Deployment(units["prefill_unit"]["nodes"],
                                        units["decode_unit"]["nodes"]),
        # The first row of each model names it (in an error about its price).
        model_fields={row["model"]: f"hourly_tokens[{i}].model" for i, row in reversed(rows)})
