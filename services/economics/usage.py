"""A day of usage (window, GPU occupancy, GPU price, traffic to bill) and the usage file's schema.

The usage file is deepseek_day6.json's schema, extended (docs/economics.md). USAGE checks each
field's shape and type; `parse_usage` then checks what spans fields (spans inside the window,
overlaps, totals that must agree), naming the field: `node_schedule[3].to`, `tokens.output_total`.
A DayUsage also comes from per-request records (metering.day_usage_from_records).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta, timezone
from decimal import Decimal
from typing import Any

from services.economics.prices import EMBEDDED_KEY, PriceTable, parse_price_table
from services.economics.schedule import PHASE, Occupancy, Sample, Schedule
from services.economics.spec import DataError, Obj, Opt, count, list_of, map_of, number, text
from services.economics.tokens import TokenCounts
from services.economics.window import Window, date_time, moment, zone


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
    traffic_timed: bool  # False: day totals only, spread over the day when billed
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

    def tokens_of(self, model: str) -> TokenCounts:
        return TokenCounts.sum(b.tokens for b in self.traffic if b.model == model)


# ---- the usage file ----

SCHEDULES = ("node_schedule", "node_schedule_utc8", "node_samples")  # exactly one is given
TRAFFIC = ("tokens", "tokens_by_model", "hourly_tokens")  # coarse to fine; the finest is billed
UTC8 = timezone(timedelta(hours=8))  # node_schedule_utc8 is in DeepSeek's clock
_FRACTION_TOLERANCE = Decimal("0.0005")  # published fractions are rounded to 3 decimals

# input_cache_miss may replace or accompany input_total (then they must agree).
TOKENS = {"input_cache_hit": count(), "output_total": count(), "input_total": Opt(count()),
          "input_cache_miss": Opt(count()), "input_cache_hit_fraction": Opt(number())}
COUNTS = {"nodes": Opt(count()), "gpus": Opt(count()), "phase": Opt(PHASE)}
ENTRIES = "must list at least one entry"
FIGURE = Opt(number(None))
USAGE = Obj({
    "window": Obj({"timezone": zone, "from": date_time, "to": date_time}),
    "hardware": Obj({"gpus_per_node": count(1), "usd_per_gpu_hour": number()}),
    "node_schedule": Opt(list_of(Obj({"from": moment, "to": moment, **COUNTS}), ENTRIES)),
    "node_schedule_utc8": Opt(list_of(Obj({"from": moment, "to": moment, **COUNTS}), ENTRIES)),
    "node_samples": Opt(list_of(Obj({"at": moment, **COUNTS}), ENTRIES)),
    "tokens": Opt(Obj(TOKENS)),
    "tokens_by_model": Opt(map_of(Obj(TOKENS), "must list at least one model")),
    "hourly_tokens": Opt(list_of(Obj({"from": moment, "to": Opt(moment), "model": Opt(text),
                                      **TOKENS}), "must list at least one row")),
    "billed_as": Opt(text),
    "published_results": Opt(Obj({"billed_as": Opt(text), "cost_usd_per_day": FIGURE,
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
    d = USAGE(doc, "")
    w = d["window"]  # a date-time without its offset is read in the window's zone
    start, end = (t if t.tzinfo else t.replace(tzinfo=w["timezone"]) for t in (w["from"], w["to"]))
    if end <= start:
        raise DataError("window.to", "must be after window.from")
    window, notes = Window(start, end, w["timezone"]), []
    schedule = _schedule(d, window)
    traffic, model_fields = _traffic(d, window, notes)
    pub, nodes = d["published_results"] or {}, d["nodes"] or {}
    published = Published(pub.get("cost_usd_per_day"), pub.get("theoretical_revenue_usd_per_day"),
                          pub.get("cost_profit_margin"), nodes.get("peak"), nodes.get("average"))
    rates, units = d["throughput_per_node"], d["deployment"]
    return DayUsage(
        window, schedule, d["hardware"]["usd_per_gpu_hour"], traffic,
        traffic_timed=d["hourly_tokens"] is not None, prices=d[EMBEDDED_KEY],
        published=published if pub or nodes else None,
        throughput=rates and NodeThroughput(*rates.values()),
        deployment=units and Deployment(units["prefill_unit"]["nodes"],
                                        units["decode_unit"]["nodes"]),
        model_fields=model_fields, notes=tuple(notes))


def _schedule(d: dict[str, Any], window: Window) -> Schedule:
    present = [key for key in SCHEDULES if d[key] is not None]
    if not present:
        raise DataError("node_schedule", f"is required (or one of {', '.join(SCHEDULES[1:])})")
    if len(present) > 1:
        raise DataError(present[1], f"give one occupancy schedule, not {' and '.join(present)}")
    key, gpus_per_node = present[0], d["hardware"]["gpus_per_node"]
    if key == "node_schedule_utc8":
        window = replace(window, tz=UTC8)  # its clock times are UTC+8 whatever the window says

    def gpus(entry: dict[str, Any], path: str) -> int:
        if entry["nodes"] is not None and entry["gpus"] is not None:
            raise DataError(f"{path}.gpus", "give nodes or gpus, not both")
        if entry["nodes"] is None and entry["gpus"] is None:
            raise DataError(f"{path}.nodes", "is required")
        return entry["nodes"] * gpus_per_node if entry["gpus"] is None else entry["gpus"]

    entries = [(entry, f"{key}[{i}]") for i, entry in enumerate(d[key])]
    if len({entry["phase"] is None for entry, _ in entries}) > 1:
        path = next(path for entry, path in entries if entry["phase"] is None)
        samples = key == "node_samples"
        raise DataError(key if samples else f"{path}.phase",
                        f"name a phase on every {'sample' if samples else 'entry'} or on none")
    if key == "node_samples":
        samples, last = [], {}  # last: phase -> (offset, path) of its latest sample
        for entry, path in entries:
            at = window.offset(entry["at"], f"{path}.at")
            window.check_inside(at, f"{path}.at")
            if entry["phase"] in last and at <= last[entry["phase"]][0]:
                raise DataError(f"{path}.at", f"must be after {last[entry['phase']][1]}.at")
            last[entry["phase"]] = at, path
            samples.append(Sample(at, gpus(entry, path), entry["phase"]))
        return Schedule.from_samples(samples, window.seconds, gpus_per_node)
    intervals = [Occupancy(*window.span(entry["from"], entry["to"], path), gpus(entry, path),
                           entry["phase"]) for entry, path in entries]
    order = sorted(range(len(intervals)),
                   key=lambda k: (str(intervals[k].phase), intervals[k].start))
    for a, b in zip(order, order[1:], strict=False):
        if intervals[a].phase == intervals[b].phase and intervals[b].start < intervals[a].end:
            raise DataError(f"{key}[{b}].from", f"overlaps {key}[{a}] (same phase)")
    return Schedule(tuple(intervals), gpus_per_node)


def _traffic(d: dict[str, Any], window: Window, notes: list[str]
             ) -> tuple[tuple[TrafficBucket, ...], dict[str, str]]:
    """The finest traffic block as buckets, each coarser block checked against the finer ones,
    and model -> the field that named it."""
    # block name -> its rows: (start, end, model or None, counts, path)
    whole, blocks = (0, window.seconds), {}
    if d["tokens"] is not None:
        blocks["tokens"] = [(*whole, None, _counts(d["tokens"], "tokens", notes), "tokens")]
    if d["tokens_by_model"] is not None:
        blocks["tokens_by_model"] = [
            (*whole, m, _counts(t, f"tokens_by_model.{m}", notes), f"tokens_by_model.{m}")
            for m, t in d["tokens_by_model"].items()]
    if d["hourly_tokens"] is not None:
        paths = [f"hourly_tokens[{i}]" for i in range(len(d["hourly_tokens"]))]
        blocks["hourly_tokens"] = [(*window.span(row["from"], row["to"], path), row["model"],
                                    _counts(row, path, notes), path)
                                   for row, path in zip(d["hourly_tokens"], paths, strict=True)]
    if not blocks:
        raise DataError("tokens", "is required (or tokens_by_model, or hourly_tokens)")
    names, model_fields = list(blocks), {}
    for name in names:
        for *_, model, _, path in blocks[name]:
            if model is not None:
                where = path if name == "tokens_by_model" else f"{path}.model"
                model_fields.setdefault(model, where)
    billed, billed_as = [], _billed_as(d)
    for start, end, model, counts, path in blocks[names[-1]]:
        if model is None and billed_as is None:
            raise DataError("published_results.billed_as",
                            f"is required to bill {path} (or give {path}.model)")
        if model is None:
            model_fields.setdefault(*billed_as)
        billed.append((start, end, model or billed_as[0], counts, path))
    blocks[names[-1]] = billed
    for i, coarse in enumerate(names):
        for finer in names[i + 1:]:
            for *_, model, stated, path in blocks[coarse]:
                parts = TokenCounts.sum(c for *_, m, c, _ in blocks[finer] if model in (None, m))
                _agree(stated, parts, path, finer if model is None else f"{finer} rows of {model}")
    return tuple(TrafficBucket(*row[:4]) for row in billed), model_fields


def _billed_as(d: dict[str, Any]) -> tuple[str, str] | None:
    """(model, field) that counts without a model are billed as."""
    named = [((d["published_results"] or {}).get("billed_as"), "published_results.billed_as"),
             (d["billed_as"], "billed_as")]
    found = [(model, path) for model, path in named if model is not None]
    if len(found) == 2 and found[0][0] != found[1][0]:
        raise DataError("billed_as",
                        f"disagrees with published_results.billed_as ({found[0][0]!r})")
    return found[0] if found else None


def _counts(block: dict[str, Any], path: str, notes: list[str]) -> TokenCounts:
    hit, total, miss = block["input_cache_hit"], block["input_total"], block["input_cache_miss"]
    if total is None and miss is None:
        raise DataError(f"{path}.input_total", "is required (or input_cache_miss)")
    if total is not None and hit > total:
        raise DataError(f"{path}.input_cache_hit", f"exceeds input_total ({total})")
    if total is not None and miss is not None and miss != total - hit:
        raise DataError(f"{path}.input_cache_miss",
                        f"must equal input_total - input_cache_hit = {total - hit}")
    counts = TokenCounts(hit, total - hit if miss is None else miss, block["output_total"])
    stated = block["input_cache_hit_fraction"]
    if stated is not None and counts.input_total:
        actual = Decimal(hit) / Decimal(counts.input_total)
        if abs(stated - actual) > _FRACTION_TOLERANCE:  # informational: the counts are billed
            notes.append(f"{path}.input_cache_hit_fraction ({stated}) is informational and "
                         f"disagrees with the counts ({actual:.4f}); the counts are billed")
    return counts


def _agree(stated: TokenCounts, summed: TokenCounts, path: str, parts: str) -> None:
    for attribute, name in (("input_cache_hit", "input_cache_hit"),
                            ("input_cache_miss", "input_cache_miss"), ("output", "output_total")):
        if getattr(stated, attribute) != getattr(summed, attribute):
            raise DataError(f"{path}.{name}", f"is {getattr(stated, attribute)} but {parts} sum "
                                              f"to {getattr(summed, attribute)}")
