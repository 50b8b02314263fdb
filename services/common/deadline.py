"""How long to wait for a reply, from the replies seen so far (pure).

An operation of n units (tokens) is expected to take at most what a slow recent one took,
scaled up linearly when n is larger than that one's units (never down: small operations are
dominated by fixed costs). "Slow" is the `quantile` of the recent scaled durations (1.0: the
slowest). The deadline is `factor` times that, within [floor_s, ceiling_s]; until `warmup`
samples were seen it is the ceiling (the first operations pay for lazy initialisation).
Used for expert dispatches, prefill calls and the gap between a stream's tokens: a stopped or
black-holed peer costs about one deadline, not the configured timeout.
"""

from __future__ import annotations

from collections import deque


class ObservedDeadline:
    def __init__(self, floor_s: float = 0.5, ceiling_s: float = 30.0, factor: float = 8.0,
                 window: int = 64, warmup: int = 8, quantile: float = 1.0) -> None:
        if not 0 < floor_s <= ceiling_s:
            raise ValueError(f"need 0 < floor_s <= ceiling_s, got {floor_s}, {ceiling_s}")
        if factor < 1 or window < 1 or warmup < 0 or not 0 < quantile <= 1:
            raise ValueError("factor must be >= 1, window >= 1, warmup >= 0, quantile in (0, 1]")
        self.floor_s, self.ceiling_s, self.factor = floor_s, ceiling_s, factor
        self.warmup, self.quantile = warmup, quantile
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self._seen = 0

    def observe(self, units: int, seconds: float) -> None:
        """One operation of `units` units took `seconds`."""
        self._recent.append((max(1, units), max(0.0, seconds)))
        self._seen += 1

    def deadline(self, units: int = 1) -> float:
        if self._seen < self.warmup or not self._recent:
            return self.ceiling_s
        n = max(1, units)
        scaled = [s * max(1.0, n / u) for u, s in self._recent]
        if self.quantile == 1.0:  # the slowest: no sort (this runs at every expert dispatch)
            expected = max(scaled)
        else:
            scaled.sort()
            expected = scaled[min(len(scaled) - 1, int(self.quantile * len(scaled)))]
        return min(self.ceiling_s, max(self.floor_s, self.factor * expected))
