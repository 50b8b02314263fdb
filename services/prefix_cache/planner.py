"""Read a cached page from disk, or recompute it? (pure)

Reading k pages costs bytes / disk bandwidth; recomputing them costs tokens / prefill speed.
Both are estimated from measurements: exponentially weighted sums of bytes and seconds (and
of tokens and seconds), so the estimate is a rate over recent work in which a large read
counts more than a small one, rather than an average of per-read rates that a few tiny reads
could dominate. Until both are known the answer is yes, so the first reads measure the disk.
Thread-safe: reads are observed on the lookup thread, forward passes on the caller's.
"""

from __future__ import annotations

import threading

MIN_SECONDS = 1e-6  # a measurement below the clock's resolution


class _Rate:
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.amount = 0.0
        self.seconds = 0.0

    def observe(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds < 0:
            return  # nothing was measured
        seconds = max(seconds, MIN_SECONDS)
        if self.seconds == 0.0:
            self.amount, self.seconds = float(amount), seconds
        else:
            self.amount += self.alpha * (amount - self.amount)
            self.seconds += self.alpha * (seconds - self.seconds)

    @property
    def per_second(self) -> float | None:
        return self.amount / self.seconds if self.seconds > 0 else None


class ReadPlanner:
    def __init__(self, alpha: float = 0.2, margin: float = 1.0) -> None:
        """`alpha`: weight of the newest measurement; read when read time * margin is less
        than recompute time (margin > 1 favours recomputing)."""
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if margin <= 0:
            raise ValueError("margin must be > 0")
        self.margin = margin
        self._read = _Rate(alpha)
        self._prefill = _Rate(alpha)
        self._lock = threading.Lock()

    def observe_read(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._read.observe(nbytes, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._prefill.observe(tokens, seconds)

    @property
    def read_bytes_per_s(self) -> float | None:
        with self._lock:
            return self._read.per_second

    @property
    def prefill_tokens_per_s(self) -> float | None:
        with self._lock:
            return self._prefill.per_second

    def worth_reading(self, nbytes: int, tokens: int) -> bool:
        with self._lock:
            bandwidth, speed = self._read.per_second, self._prefill.per_second
        if bandwidth is None or speed is None:
            return True
        return nbytes / bandwidth * self.margin < tokens / speed
