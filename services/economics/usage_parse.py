"""Parse and validate a usage file (the deepseek_day6.json schema, extended) into a DayUsage.

Every rejection is a DataError naming the field path, e.g. `tokens.output_total`,
`node_schedule[3].to`, `hourly_tokens[5].model`. docs/economics.md documents the schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta, timezone
from decimal import Decimal
from typing import Any

from services.economics.clock import Window, parse_offset, parse_span, parse_window
from services.economics.fields import (
    DataError,
    decimal,
    integer,
    join,
    mapping,
    required,
    sequence,
    text,
)
from services.economics.prices_parse import EMBEDDED_KEY, parse_embedded
from services.economics.schedule import PHASES, Occupancy, Sample, Schedule
from services.economics.traffic_parse import billed_as_model, parse_traffic
from services.economics.usage import (
    DayUsage,
    Deployment,
    NodeThroughput,
    Published,
)

SCHEDULE_KEYS = ("node_schedule", "node_schedule_utc8", "node_samples")
UTC8 = timezone(timedelta(hours=8))


def parse_usage(doc: Any) -> DayUsage:
    root = mapping(doc, "usage")
    window = parse_window(mapping(required(root, "window", ""), "window"), "window")
    hardware = mapping(required(root, "hardware", ""), "hardware")
    gpus_per_node = integer(
        required(hardware, "gpus_per_node", "hardware"), "hardware.gpus_per_node", minimum=1
    )
    usd_per_gpu_hour = decimal(
        required(hardware, "usd_per_gpu_hour", "hardware"), "hardware.usd_per_gpu_hour"
    )
    schedule = parse_schedule(root, window, gpus_per_node)
    traffic, timed, model_fields, notes = parse_traffic(root, window, billed_as_model(root))
    prices = None
    if EMBEDDED_KEY in root:
        prices = parse_embedded(
            root[EMBEDDED_KEY], EMBEDDED_KEY, source=f"usage file ({EMBEDDED_KEY})"
        )
    return DayUsage(
        window=window,
        schedule=schedule,
        usd_per_gpu_hour=usd_per_gpu_hour,
        traffic=traffic,
        traffic_timed=timed,
        prices=prices,
        published=_parse_published(root),
        throughput=_parse_throughput(root),
        deployment=_parse_deployment(root),
        model_fields=model_fields,
        notes=tuple(notes),
    )


# ---- occupancy ----


def parse_schedule(root: Mapping[str, Any], window: Window, gpus_per_node: int) -> Schedule:
    present = [key for key in SCHEDULE_KEYS if key in root]
    if not present:
        raise DataError("node_schedule", f"is required (or one of {', '.join(SCHEDULE_KEYS[1:])})")
    if len(present) > 1:
        raise DataError(present[1], f"give one occupancy schedule, not {' and '.join(present)}")
    key = present[0]
    entries = sequence(root[key], key)
    if not entries:
        raise DataError(key, "must list at least one entry")
    if key == "node_schedule_utc8":
        window = replace(window, tz=UTC8)  # its clock times are UTC+8 whatever the window says
    if key == "node_samples":
        samples = [
            _parse_sample(e, window, gpus_per_node, join(key, i)) for i, e in enumerate(entries)
        ]
        _check_samples_increase(samples, key)
        return Schedule.from_samples(samples, window.seconds, gpus_per_node)
    intervals = [
        _parse_interval(e, window, gpus_per_node, join(key, i)) for i, e in enumerate(entries)
    ]
    _check_no_overlap(intervals, key)
    try:
        return Schedule(tuple(intervals), gpus_per_node)
    except ValueError as exc:
        raise DataError(key, str(exc)) from None


def _parse_interval(doc: Any, window: Window, gpus_per_node: int, path: str) -> Occupancy:
    entry = mapping(doc, path)
    start, end = parse_span(
        required(entry, "from", path),
        required(entry, "to", path),
        window,
        join(path, "from"),
        join(path, "to"),
    )
    return Occupancy(start, end, _gpus(entry, gpus_per_node, path), _phase(entry, path))


def _parse_sample(doc: Any, window: Window, gpus_per_node: int, path: str) -> Sample:
    entry = mapping(doc, path)
    at = parse_offset(required(entry, "at", path), window, join(path, "at"))
    if not 0 <= at < window.seconds:
        raise DataError(join(path, "at"), "lies outside the usage window")
    return Sample(at, _gpus(entry, gpus_per_node, path), _phase(entry, path))


def _gpus(entry: Mapping[str, Any], gpus_per_node: int, path: str) -> int:
    if "nodes" in entry and "gpus" in entry:
        raise DataError(join(path, "gpus"), "give nodes or gpus, not both")
    if "gpus" in entry:
        return integer(entry["gpus"], join(path, "gpus"))
    return integer(required(entry, "nodes", path), join(path, "nodes")) * gpus_per_node


def _phase(entry: Mapping[str, Any], path: str) -> str | None:
    if entry.get("phase") is None:
        return None
    phase = text(entry["phase"], join(path, "phase"))
    if phase not in PHASES:
        raise DataError(join(path, "phase"), f"must be one of {', '.join(PHASES)}, got {phase!r}")
    return phase


def _check_no_overlap(intervals: list[Occupancy], key: str) -> None:
    if len({i.phase is None for i in intervals}) > 1:
        first = next(k for k, i in enumerate(intervals) if i.phase is None)
        raise DataError(join(join(key, first), "phase"), "name a phase on every entry or on none")
    order = sorted(
        range(len(intervals)), key=lambda k: (str(intervals[k].phase), intervals[k].start)
    )
    for a, b in zip(order, order[1:], strict=False):
        first, second = intervals[a], intervals[b]
        if first.phase == second.phase and second.start < first.end:
            raise DataError(join(join(key, b), "from"), f"overlaps {key}[{a}] (same phase)")


def _check_samples_increase(samples: list[Sample], key: str) -> None:
    if len({s.phase is None for s in samples}) > 1:
        raise DataError(key, "name a phase on every sample or on none")
    last: dict[str | None, tuple[int, int]] = {}
    for k, sample in enumerate(samples):
        if sample.phase in last and sample.at <= last[sample.phase][0]:
            raise DataError(
                join(join(key, k), "at"), f"must be after {key}[{last[sample.phase][1]}].at"
            )
        last[sample.phase] = (sample.at, k)


# ---- optional blocks ----


def _parse_published(root: Mapping[str, Any]) -> Published | None:
    published = root.get("published_results")
    nodes = root.get("nodes")
    if published is None and nodes is None:
        return None
    pub = mapping(published or {}, "published_results")
    node_doc = mapping(nodes or {}, "nodes")

    def optional(block: Mapping[str, Any], key: str, path: str) -> Decimal | None:
        return (
            None if block.get(key) is None else decimal(block[key], join(path, key), minimum=None)
        )

    return Published(
        cost_usd=optional(pub, "cost_usd_per_day", "published_results"),
        revenue_usd=optional(pub, "theoretical_revenue_usd_per_day", "published_results"),
        margin=optional(pub, "cost_profit_margin", "published_results"),
        peak_nodes=optional(node_doc, "peak", "nodes"),
        avg_nodes=optional(node_doc, "average", "nodes"),
        note=str(pub.get("note", "")),
    )


def _parse_throughput(root: Mapping[str, Any]) -> NodeThroughput | None:
    if root.get("throughput_per_node") is None:
        return None
    path = "throughput_per_node"
    block = mapping(root[path], path)
    prefill_key, decode_key = "prefill_input_tok_per_s_incl_cache_hits", "decode_output_tok_per_s"
    prefill = decimal(
        required(block, prefill_key, path), join(path, prefill_key), minimum=Decimal(1)
    )
    decode = decimal(required(block, decode_key, path), join(path, decode_key), minimum=Decimal(1))
    return NodeThroughput(prefill, decode)


def _parse_deployment(root: Mapping[str, Any]) -> Deployment | None:
    if root.get("deployment") is None:
        return None
    block = mapping(root["deployment"], "deployment")
    sizes = []
    for unit in ("prefill_unit", "decode_unit"):
        path = join("deployment", unit)
        unit_doc = mapping(required(block, unit, "deployment"), path)
        sizes.append(integer(required(unit_doc, "nodes", path), join(path, "nodes"), minimum=1))
    return Deployment(*sizes)
