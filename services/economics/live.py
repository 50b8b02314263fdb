"""The live cluster's day: the ledger's buckets and uptimes as a DayUsage for `compute_report`
(pure), so `economics live` and the offline `report` share one code path from there on.

The window runs from `since` rounded down to the hour (default: the first hour with a bucket or
an uptime) to `until` (default: now), in whole seconds. Buckets are hourly (or cut at a tier
switch), so one that started before the window is left out whole and the last one ends at the
window's end (every request in it started before then). Occupancy: each uptime interval counts
its devices; their sum over time is the node schedule, `gpus_per_node` devices to a node.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timezone
from decimal import Decimal

from services.economics.tally import DeviceUptime, TokenBucket
from services.economics.usage import DayUsage, Occupancy, Schedule, TrafficBucket
from services.economics.window import Window


def live_window(buckets: Iterable[TokenBucket], uptimes: Iterable[DeviceUptime], *,
                now: float, since: datetime | None = None, until: datetime | None = None,
                tz: timezone = UTC) -> Window | None:
    """None when the ledger holds nothing in the asked span."""
    end = int(until.timestamp()) if until is not None else int(now)
    if since is not None:
        first = int(since.timestamp())
    else:
        starts = [b.start for b in buckets] + [u.intervals[0][0] for u in uptimes if u.intervals]
        if not starts:
            return None
        first = int(min(starts))
    start = first // 3600 * 3600
    if end <= start:
        return None
    return Window(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC), tz)


def occupancy_schedule(uptimes: Iterable[DeviceUptime], window: Window) -> list[Occupancy]:
    """Devices up at each second of the window, as non-overlapping steps (whole seconds:
    an interval's ends are rounded down)."""
    w0, seconds = int(window.start.timestamp()), window.seconds
    delta: dict[int, int] = {}
    for uptime in uptimes:
        for a, b in uptime.intervals:
            lo, hi = max(int(a) - w0, 0), min(int(b) - w0, seconds)
            if lo < hi:
                delta[lo] = delta.get(lo, 0) + uptime.devices
                delta[hi] = delta.get(hi, 0) - uptime.devices
    steps, level, times = [], 0, sorted(delta)
    for t, nxt in zip(times, times[1:], strict=False):
        level += delta[t]
        if level:
            if steps and steps[-1].end == t and steps[-1].gpus == level:
                steps[-1] = Occupancy(steps[-1].start, nxt, level)
            else:
                steps.append(Occupancy(t, nxt, level))
    return steps


def live_usage(buckets: Iterable[TokenBucket], uptimes: Iterable[DeviceUptime], window: Window,
               *, usd_per_gpu_hour: Decimal, gpus_per_node: int, tenant: str | None = None
               ) -> DayUsage:
    buckets, uptimes = list(buckets), list(uptimes)
    w0, w1 = int(window.start.timestamp()), int(window.end.timestamp())
    traffic = tuple(
        TrafficBucket(b.start - w0, min(b.end, w1) - w0, b.model, b.tokens)
        for b in sorted(buckets, key=lambda b: (b.start, b.model, b.tenant))
        if w0 <= b.start < w1 and (tenant is None or b.tenant == tenant) and b.tokens.total)
    notes = [f"occupancy from heartbeats: {len(uptimes)} device holder(s) (prefill, decode, "
             f"expert workers), each from its process start to its last heartbeat"]
    if tenant is not None:
        notes.append(f"tokens and revenue of tenant {tenant!r} only; cost is the whole cluster's")
    schedule = Schedule(tuple(occupancy_schedule(uptimes, window)), gpus_per_node)
    return DayUsage(window, schedule, usd_per_gpu_hour, traffic, notes=tuple(notes),
                    model_fields={m: "ledger bucket model" for m in {b.model for b in traffic}})
