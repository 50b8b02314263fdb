"""Exact decimal arithmetic and display rounding for money, hours and token apportioning.

Money is never a binary float. Products of tokens and prices are exact; the only inexact step
is a division whose quotient does not terminate (seconds -> hours for odd minutes, averages),
which is carried at PRECISION significant digits and rounded only when displayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Context, Decimal, localcontext

PRECISION = 50
EXACT = Context(prec=PRECISION, rounding=ROUND_HALF_EVEN)
SECONDS_PER_HOUR = 3600
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per million tokens


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


def margin(revenue: Decimal, cost: Decimal) -> Decimal | None:
    """DeepSeek's cost-profit margin: revenue / cost - 1 (5.45 means 545 %); None if no cost."""
    if cost == 0:
        return None
    return EXACT.subtract(div(revenue, cost), Decimal(1))


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split a whole number of tokens in proportion to integer weights (largest remainder).

    The parts are whole, sum exactly to `total`, and each is within 1 of its exact share; ties
    go to the earlier part so the split is deterministic. All weights zero: split equally.
    """
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError("apportion needs a non-negative total and weights")
    if not weights:
        if total:
            raise ValueError("cannot apportion tokens over no parts")
        return []
    if sum(weights) == 0:
        weights = [1] * len(weights)
    weight_sum = sum(weights)
    parts = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    leftover = total - sum(parts)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[:leftover]:
        parts[i] += 1
    return parts


# ---- display (the only place where money is rounded) ----


def plain(value: Decimal) -> str:
    """An exact decimal as a plain string without exponent or trailing zeros (JSON money)."""
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1), context=EXACT))
    return format(value.normalize(EXACT), "f")


def usd(value: Decimal, places: int | None = None) -> str:
    """Dollars for display: whole dollars, or cents for amounts under $100 (places=None)."""
    if places is None:
        places = 2 if abs(value) < 100 else 0
    rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    sign = "-" if rounded < 0 else ""
    return f"{sign}${abs(rounded):,.{places}f}"


def number(value: Decimal, places: int = 2) -> str:
    """Thousands separators; trailing zeros dropped so 5442.00 prints as 5,442."""
    rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    if rounded == rounded.to_integral_value():
        return f"{rounded:,.0f}"
    return f"{rounded.normalize():,f}"


def percent(ratio: Decimal | None) -> str:
    """A margin as a whole percent, floored so the headline never overstates (DeepSeek: 545 %),
    with two decimals beside it: '545% (545.56%)'."""
    if ratio is None:
        return "n/a (no cost)"
    scaled = ratio.scaleb(2)
    whole = scaled.quantize(Decimal(1), rounding=ROUND_FLOOR)
    fine = scaled.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
    return f"{whole:,.0f}% ({fine:,.2f}%)"


def relative_difference(value: Decimal, reference: Decimal) -> Decimal | None:
    if reference == 0:
        return None
    return div(value - reference, reference)
