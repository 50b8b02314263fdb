"""Parse the traffic part of a usage file: `tokens`, `tokens_by_model`, `hourly_tokens`.

Token blocks use the deepseek_day6.json names: input_cache_hit, input_total (or
input_cache_miss), output_total. Counts without a `model` are billed as
`published_results.billed_as` (or a top-level `billed_as`). When several blocks are given, the
finest is billed and the others must agree with its sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from services.economics.clock import Window, check_span, parse_offset, parse_span
from services.economics.fields import (
    DataError,
    decimal,
    integer,
    join,
    mapping,
    required,
    sequence,
    text,
)
from services.economics.tokens import TokenCounts
from services.economics.usage import TrafficBucket

_FRACTION_TOLERANCE = Decimal("0.0005")  # published fractions are rounded to 3 decimals


def billed_as_model(root: Mapping[str, Any]) -> tuple[str, str] | None:
    """(model, field path) that un-modelled token counts are billed as."""
    published = root.get("published_results")
    found = []
    if isinstance(published, Mapping) and published.get("billed_as") is not None:
        found.append(
            (
                text(published["billed_as"], "published_results.billed_as"),
                "published_results.billed_as",
            )
        )
    if root.get("billed_as") is not None:
        found.append((text(root["billed_as"], "billed_as"), "billed_as"))
    if len(found) == 2 and found[0][0] != found[1][0]:
        raise DataError(
            "billed_as", f"disagrees with published_results.billed_as ({found[0][0]!r})"
        )
    return found[0] if found else None


def parse_traffic(
    root: Mapping[str, Any], window: Window, billed_as: tuple[str, str] | None
) -> tuple[tuple[TrafficBucket, ...], bool, dict[str, str], list[str]]:
    """(buckets, timed, model -> field path, notes)."""
    notes: list[str] = []
    model_fields: dict[str, str] = {}

    def model_of(entry: Mapping[str, Any], path: str) -> str:
        if entry.get("model") is not None:
            name = text(entry["model"], join(path, "model"))
            model_fields.setdefault(name, join(path, "model"))
            return name
        if billed_as is None:
            raise DataError(
                "published_results.billed_as",
                f"is required to bill {path} (or give {join(path, 'model')})",
            )
        model_fields.setdefault(billed_as[0], billed_as[1])
        return billed_as[0]

    day_totals: TokenCounts | None = None
    if "tokens" in root:
        tokens_doc = mapping(root["tokens"], "tokens")
        day_totals = parse_tokens(tokens_doc, "tokens", notes)
    by_model: dict[str, TokenCounts] | None = None
    if "tokens_by_model" in root:
        block = mapping(root["tokens_by_model"], "tokens_by_model")
        by_model = {}
        for name, value in block.items():
            path = join("tokens_by_model", str(name))
            by_model[str(name)] = parse_tokens(mapping(value, path), path, notes)
            model_fields.setdefault(str(name), path)
        if not by_model:
            raise DataError("tokens_by_model", "must list at least one model")
        if day_totals is not None:
            _check_sum(day_totals, TokenCounts.sum(by_model.values()), "tokens", "tokens_by_model")

    if "hourly_tokens" in root:
        rows = sequence(root["hourly_tokens"], "hourly_tokens")
        if not rows:
            raise DataError("hourly_tokens", "must list at least one row")
        buckets = []
        for i, row_doc in enumerate(rows):
            path = join("hourly_tokens", i)
            row = mapping(row_doc, path)
            start = parse_offset(required(row, "from", path), window, join(path, "from"))
            if "to" in row:
                start, end = parse_span(
                    row["from"], row["to"], window, join(path, "from"), join(path, "to")
                )
            else:
                end = start + 3600
                check_span(start, end, window, join(path, "from"), join(path, "from"))
            buckets.append(
                TrafficBucket(start, end, model_of(row, path), parse_tokens(row, path, notes))
            )
        if day_totals is not None:
            _check_sum(
                day_totals, TokenCounts.sum(b.tokens for b in buckets), "tokens", "hourly_tokens"
            )
        for name, counts in (by_model or {}).items():
            rows_of = TokenCounts.sum(b.tokens for b in buckets if b.model == name)
            _check_sum(
                counts, rows_of, join("tokens_by_model", name), f"hourly_tokens rows of {name}"
            )
        return tuple(buckets), True, model_fields, notes

    whole_day = (0, window.seconds)
    if by_model is not None:
        buckets = tuple(TrafficBucket(*whole_day, name, c) for name, c in by_model.items())
        return buckets, False, model_fields, notes
    if day_totals is not None:
        bucket = TrafficBucket(*whole_day, model_of({}, "tokens"), day_totals)
        return (bucket,), False, model_fields, notes
    raise DataError("tokens", "is required (or tokens_by_model, or hourly_tokens)")


def parse_tokens(entry: Mapping[str, Any], path: str, notes: list[str]) -> TokenCounts:
    """input_cache_hit, input_cache_miss or input_total (or both, if they agree), output_total."""
    hit = integer(required(entry, "input_cache_hit", path), join(path, "input_cache_hit"))
    output = integer(required(entry, "output_total", path), join(path, "output_total"))
    has_miss, has_total = "input_cache_miss" in entry, "input_total" in entry
    if not has_miss and not has_total:
        raise DataError(join(path, "input_total"), "is required (or input_cache_miss)")
    if has_total:
        total = integer(entry["input_total"], join(path, "input_total"))
        if hit > total:
            raise DataError(join(path, "input_cache_hit"), f"exceeds input_total ({total})")
        miss = total - hit
    if has_miss:
        given_miss = integer(entry["input_cache_miss"], join(path, "input_cache_miss"))
        if has_total and given_miss != miss:
            raise DataError(
                join(path, "input_cache_miss"), f"must equal input_total - input_cache_hit = {miss}"
            )
        miss = given_miss
    counts = TokenCounts(hit, miss, output)
    if "input_cache_hit_fraction" in entry and counts.input_total:
        stated = decimal(entry["input_cache_hit_fraction"], join(path, "input_cache_hit_fraction"))
        actual = Decimal(hit) / Decimal(counts.input_total)
        if abs(stated - actual) > _FRACTION_TOLERANCE:
            notes.append(
                f"{path}.input_cache_hit_fraction ({stated}) is informational and disagrees with "
                f"the counts ({actual:.4f}); the counts are billed"
            )
    return counts


def _check_sum(stated: TokenCounts, summed: TokenCounts, path: str, parts: str) -> None:
    pairs = (
        ("input_cache_hit", "input_cache_hit"),
        ("input_cache_miss", "input_cache_miss"),
        ("output", "output_total"),
    )
    for attribute, name in pairs:
        a, b = getattr(stated, attribute), getattr(summed, attribute)
        if a != b:
            raise DataError(join(path, name), f"is {a} but {parts} sum to {b}")
