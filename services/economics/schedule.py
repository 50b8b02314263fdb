"""GPU occupancy over a usage window: intervals (or samples) of GPU counts, optionally per phase.

Times are whole seconds since the window start. Counts are held in GPUs so that a schedule in
GPUs and one in nodes integrate alike; nodes are GPUs / gpus_per_node. A gap means nothing ran.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from itertools import accumulate

from services.economics import money
from services.economics.spec import one_of

PHASES = ("prefill", "decode")
PHASE = one_of(*PHASES)  # the reader of a `phase` field


@dataclass(frozen=True)
class Occupancy:
    """`gpus` busy in [start, end); `phase` None when the schedule does not say which."""

    start: int
    end: int
    gpus: int
    phase: str | None = None


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
        if len({interval.phase is None for interval in self.intervals}) > 1:
            raise ValueError("either every interval names its phase or none does")
        for phase in self.phases:
            own = sorted((i for i in self.intervals if i.phase == phase), key=lambda i: i.start)
            for before, after in zip(own, own[1:], strict=False):
                if after.start < before.end:
                    raise ValueError(
                        f"intervals overlap at second {after.start} ({phase or 'all'})")

    @staticmethod
    def from_samples(samples: Iterable[Sample], end: int, gpus_per_node: int) -> Schedule:
        """Sample-and-hold: each sample holds until the next of its phase; the first of each
        phase also covers the time before it (a scrape rarely lands on the window start)."""
        by_phase: dict[str | None, list[Sample]] = {}
        for sample in sorted(samples, key=lambda s: s.at):
            by_phase.setdefault(sample.phase, []).append(sample)
        intervals = []
        for series in by_phase.values():
            bounds = [0, *(s.at for s in series[1:]), end]
            intervals += [Occupancy(a, b, s.gpus, s.phase)
                          for a, b, s in zip(bounds, bounds[1:], series, strict=False) if b > a]
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
