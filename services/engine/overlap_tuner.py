"""Whether two micro-batches pay on this instance, learned from its own step times (pure).

Overlap hides the expert round trip behind the other micro-batch's attention, but it also
doubles every per-op cost of a step. Which one wins depends on the shape of the step, the wire,
the model and the cores, so it is measured rather than predicted: for each (phase, size bucket)
the tuner keeps the step time per token of the last `window` steps run each way, and a step the
plan would split runs the way whose median is lower. A median, because on shared cores one step
in a few is slowed by something else (a neighbour's burst, a collection) by more than the
difference being measured.

- Size buckets are powers of two of the step's tokens, so a decode step of 8 sequences and a
  prefill of 900 tokens never share an estimate.
- Until both ways have `warmup` samples in a bucket, the two take turns.
- After that, every `explore_every`-th step of a bucket runs the way not chosen, so a change
  in the wire or the load (a worker's link slowing down, a neighbour going idle) is noticed.
  That bounds the cost of tuning at one step in `explore_every` run the slower way.
- A new plan (another version) starts from nothing: its cut policy or threshold may change
  what splitting costs.

Step times come from `record` after each step that finished; a failed step records nothing.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


def size_bucket(num_tokens: int) -> int:
    """floor(log2(num_tokens)): 1 -> 0, 2..3 -> 1, 4..7 -> 2, ..."""
    return max(int(num_tokens), 1).bit_length() - 1


@dataclass
class _Bucket:
    window: int
    samples: dict[int, deque] = field(default_factory=dict)
    steps: int = 0

    def __post_init__(self) -> None:
        self.samples = {1: deque(maxlen=self.window), 2: deque(maxlen=self.window)}


class OverlapTuner:
    def __init__(self, warmup: int = 4, explore_every: int = 32, window: int = 8) -> None:
        if not 1 <= warmup <= window or explore_every < 2:
            raise ValueError("need 1 <= warmup <= window and explore_every >= 2")
        self.warmup, self.explore_every, self.window = warmup, explore_every, window
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        self._plan_version: int | None = None

    def reset_for(self, plan_version: int) -> None:
        if plan_version != self._plan_version:
            self._buckets.clear()
            self._plan_version = plan_version

    def _bucket(self, phase: str, num_tokens: int) -> _Bucket:
        key = (phase, size_bucket(num_tokens))
        if key not in self._buckets:
            self._buckets[key] = _Bucket(self.window)
        return self._buckets[key]

    def preferred(self, phase: str, num_tokens: int) -> int | None:
        """The way with the lower median once both are warm (ties: one micro-batch), else None."""
        got = self._bucket(phase, num_tokens).samples
        if min(len(s) for s in got.values()) < self.warmup:
            return None
        return 2 if statistics.median(got[2]) < statistics.median(got[1]) else 1

    def choose(self, phase: str, num_tokens: int) -> int:
        """Micro-batches (1 or 2) for a step the plan would split."""
        bucket = self._bucket(phase, num_tokens)
        bucket.steps += 1
        best = self.preferred(phase, num_tokens)
        if best is None:  # warming up: the way with fewer samples, two first
            got = bucket.samples
            return 2 if len(got[2]) <= len(got[1]) else 1
        if bucket.steps % self.explore_every == 0:
            return 3 - best
        return best

    def record(self, phase: str, num_tokens: int, micro_batches: int, seconds: float) -> None:
        if micro_batches not in (1, 2) or num_tokens < 1 or not seconds >= 0.0:
            return
        self._bucket(phase, num_tokens).samples[micro_batches].append(seconds / num_tokens)
