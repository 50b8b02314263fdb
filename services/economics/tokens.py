"""Token counts as billed: cache-hit input, cache-miss input and output."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from services.economics import money


@dataclass(frozen=True)
class TokenCounts:
    input_cache_hit: int = 0
    input_cache_miss: int = 0
    output: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field.name} must be an integer >= 0, got {value!r}")

    @property
    def input_total(self) -> int:
        return self.input_cache_hit + self.input_cache_miss

    @property
    def total(self) -> int:
        return self.input_total + self.output

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.input_cache_hit + other.input_cache_hit,
                           self.input_cache_miss + other.input_cache_miss,
                           self.output + other.output)

    def split(self, weights: Sequence[int]) -> list[TokenCounts]:
        """Each kind of token shared out by `weights`, in whole tokens that add up exactly."""
        parts = [money.apportion(getattr(self, field.name), weights) for field in fields(self)]
        return [TokenCounts(*counts) for counts in zip(*parts, strict=True)]

    @staticmethod
    def sum(counts: Iterable[TokenCounts]) -> TokenCounts:
        return sum(counts, TokenCounts())
