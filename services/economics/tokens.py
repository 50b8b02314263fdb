"""Token counts as billed: cache-hit input, cache-miss input and output."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenCounts:
    input_cache_hit: int = 0
    input_cache_miss: int = 0
    output: int = 0

    def __post_init__(self) -> None:
        for name in ("input_cache_hit", "input_cache_miss", "output"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def input_total(self) -> int:
        return self.input_cache_hit + self.input_cache_miss

    @property
    def total(self) -> int:
        return self.input_total + self.output

    @property
    def cache_hit_fraction(self) -> float | None:
        return self.input_cache_hit / self.input_total if self.input_total else None

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(
            self.input_cache_hit + other.input_cache_hit,
            self.input_cache_miss + other.input_cache_miss,
            self.output + other.output,
        )

    @staticmethod
    def sum(counts: Iterable[TokenCounts]) -> TokenCounts:
        total = TokenCounts()
        for count in counts:
            total = total + count
        return total
