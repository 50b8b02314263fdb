"""GPU occupancy over a usage window: intervals (or samples) of node/GPU counts, per phase.

Pure: times are whole seconds since the window start. Counts are held in GPUs so that a
schedule given in GPUs and one given in nodes integrate the same way; node figures are GPUs
divided by gpus_per_node. A gap between intervals means nothing was running.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property

from services.economics import money

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Occupancy:
    """`gpus` busy from `start` (inclusive) to `end` (exclusive); `phase` is None when the
    schedule does not say which phase the nodes served."""

    start: int
    end: int
    gpus: int
    phase: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"occupancy needs 0 <= start < end, got [{self.start}, {self.end})")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ValueError(f"gpus must be an integer >= 0, got {self.gpus!r}")
        if self.phase is not None and self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES} or None, got {self.phase!r}")


@dataclass(frozen=True)
class Sample:
    """`gpus` busy from `at` until the next sample of the same phase (or the window end)."""

    at: int
    gpus: int
    phase: str | None = None


@dataclass(frozen=True)
class Schedule:
    intervals: tuple[Occupancy, ...]
    gpus_per_node: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "intervals", tuple(self.intervals))
        if isinstance(self.gpus_per_node, bool) or self.gpus_per_node <= 0:
            raise ValueError(f"gpus_per_node must be a positive integer, got {self.gpus_per_node}")
        if len({interval.phase is None for interval in self.intervals}) > 1:
            raise ValueError("either every interval names its phase or none does")
        for phase in self.phases:
            own = sorted((i for i in self.intervals if i.phase == phase), key=lambda i: i.start)
            for before, after in zip(own, own[1:], strict=False):
                if after.start < before.end:
                    raise ValueError(
                        f"intervals overlap at second {after.start} (phase {phase or 'all'})"
                    )

    @staticmethod
    def from_samples(samples: Iterable[Sample], end: int, gpus_per_node: int) -> Schedule:
        """Sample-and-hold: each sample holds until the next of its phase; the first sample of
        each phase also covers the time before it (a scrape rarely lands on the window start)."""
        by_phase: dict[str | None, list[Sample]] = {}
        for sample in samples:
            by_phase.setdefault(sample.phase, []).append(sample)
        intervals = []
        for series in by_phase.values():
            series.sort(key=lambda s: s.at)
            starts = [0] + [s.at for s in series[1:]]
            ends = [s.at for s in series[1:]] + [end]
            intervals += [
                Occupancy(start, stop, s.gpus, s.phase)
                for start, stop, s in zip(starts, ends, series, strict=True)
                if stop > start
            ]
        return Schedule(tuple(intervals), gpus_per_node)

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
    def _steps(self) -> tuple[list[int], dict[str | None, list[int]], dict[str | None, list[int]]]:
        """Per phase: GPUs on each step [edges[k], edges[k+1]) and GPU-seconds before edges[k]."""
        edges = list(self.edges)
        index = {t: k for k, t in enumerate(edges)}
        level: dict[str | None, list[int]] = {}
        cumulative: dict[str | None, list[int]] = {}
        for phase in self.phases:
            delta = [0] * (len(edges) + 1)
            for interval in self.intervals:
                if interval.phase == phase:
                    delta[index[interval.start]] += interval.gpus
                    delta[index[interval.end]] -= interval.gpus
            running, levels, cum = 0, [], [0]
            for k in range(len(edges)):
                running += delta[k]
                levels.append(running)
                if k + 1 < len(edges):
                    cum.append(cum[-1] + running * (edges[k + 1] - edges[k]))
            level[phase], cumulative[phase] = levels, cum
        return edges, level, cumulative

    def gpus_at(self, t: int, phase: str | None = None) -> int:
        """GPUs busy at second t (all phases when phase is None)."""
        edges, level, _ = self._steps
        k = bisect_right(edges, t) - 1
        if k < 0:
            return 0
        return sum(level[p][k] for p in self._select(phase))

    def gpu_seconds(self, start: int, end: int, phase: str | None = None) -> int:
        return sum(self._integral(end, p) - self._integral(start, p) for p in self._select(phase))

    def peak_gpus(self, start: int, end: int) -> int:
        """Most GPUs busy at once (all phases together) anywhere in [start, end)."""
        points = [start] + [t for t in self.edges if start < t < end]
        return max(self.gpus_at(t) for t in points)

    def nodes(self, gpus: int | Decimal) -> Decimal:
        return money.div(gpus, self.gpus_per_node)

    def _select(self, phase: str | None) -> tuple[str | None, ...]:
        if phase is None:
            return self.phases
        return (phase,) if phase in self.phases else ()

    def _integral(self, t: int, phase: str | None) -> int:
        edges, level, cumulative = self._steps
        k = bisect_right(edges, t) - 1
        if k < 0:
            return 0
        return cumulative[phase][k] + level[phase][k] * (t - edges[k])
