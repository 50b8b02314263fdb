"""Exact quantities: decimal money, token counts and their apportioning; display rounding.

Money is never a binary float: token x price products are exact, and the only inexact step, a
division that does not terminate (seconds to hours, averages), is carried to PRECISION digits.
Values are rounded only for display.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import astuple, dataclass, fields
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Context, Decimal, localcontext

PRECISION = 50
EXACT = Context(prec=PRECISION, rounding=ROUND_HALF_EVEN)
SECONDS_PER_HOUR = 3600


def exact() -> AbstractContextManager[Context]:
    """A decimal context wide enough that sums and products of our quantities never round."""
    return localcontext(EXACT)


def div(numerator: Decimal | int, denominator: Decimal | int) -> Decimal:
    return EXACT.divide(Decimal(numerator), Decimal(denominator))


def hours(seconds: int) -> Decimal:
    return div(seconds, SECONDS_PER_HOUR)


def charge(tokens: int, usd_per_million: Decimal) -> Decimal:
    """Exact USD for `tokens` at a per-million price (scaling by 10**-6 never rounds)."""
    return EXACT.multiply(Decimal(tokens), usd_per_million).scaleb(-6, EXACT)


def margin(revenue: Decimal | None, cost: Decimal) -> Decimal | None:
    """DeepSeek's cost-profit margin: revenue / cost - 1 (5.45 is 545 %); None without both."""
    if cost == 0 or revenue is None:
        return None
    return EXACT.subtract(div(revenue, cost), Decimal(1))


def relative_difference(value: Decimal, reference: Decimal | None) -> Decimal | None:
    return div(value - reference, reference) if reference else None


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Whole parts of `total` in proportion to integer weights (largest remainder): they sum
    exactly to `total`, each within 1 of its share; ties go to the earlier part. All weights
    zero: equal parts."""
    if total < 0 or any(w < 0 for w in weights) or (total and not weights):
        raise ValueError("apportion needs a non-negative total and weights, and some parts")
    weights = weights if any(weights) else [1] * len(weights)
    whole = sum(weights)
    parts = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[:total - sum(parts)]:
        parts[i] += 1
    return parts


@dataclass(frozen=True)
class TokenCounts:
    """Token counts as billed: cache-hit input, cache-miss input and output."""

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
        return TokenCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def split(self, weights: Sequence[int]) -> list[TokenCounts]:
        """Each kind of token shared out by `weights`, in whole tokens that add up exactly."""
        parts = [apportion(getattr(self, field.name), weights) for field in fields(self)]
        return [TokenCounts(*counts) for counts in zip(*parts, strict=True)]

    @staticmethod
    def sum(counts: Iterable[TokenCounts]) -> TokenCounts:
        return sum(counts, TokenCounts())


# ---- display: the only place where values are rounded ----


def _rounded(value: Decimal, places: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)


def plain(value: Decimal) -> str:
    """An exact decimal as a plain string without exponent or trailing zeros (JSON money)."""
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1), context=EXACT))
    return format(value.normalize(EXACT), "f")


def usd(value: Decimal, places: int | None = None) -> str:
    """Whole dollars, or cents for amounts under $100 (places=None)."""
    places = (2 if abs(value) < 100 else 0) if places is None else places
    rounded = _rounded(value, places)
    return f"{'-' if rounded < 0 else ''}${abs(rounded):,.{places}f}"


def number(value: Decimal, places: int = 2) -> str:
    """Thousands separators; trailing zeros dropped so 5442.00 prints as 5,442."""
    rounded = _rounded(value, places)
    whole = rounded == rounded.to_integral_value()
    return f"{rounded:,.0f}" if whole else f"{rounded.normalize():,f}"


def percent(ratio: Decimal | None) -> str:
    """A margin as a whole percent, floored so that the headline never overstates (DeepSeek's
    5.4547 is 545%), with two decimals beside it: '545% (545.56%)'."""
    if ratio is None:
        return "n/a (no cost)"
    whole = ratio.scaleb(2).quantize(Decimal(1), rounding=ROUND_FLOOR)
    return f"{whole:,.0f}% ({_rounded(ratio.scaleb(2), 2):,.2f}%)"


def signed_percent(ratio: Decimal) -> str:
    return f"{'+' if ratio >= 0 else '-'}{number(abs(ratio) * 100, 3)}%"
