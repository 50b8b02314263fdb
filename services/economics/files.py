"""Reading input files (the I/O edge): JSON, YAML or JSONL, numbers as exact decimals. Every
problem is one CliError naming the file and the field:
`usage file day.json: tokens.output_total: must be an integer >= 0, got -5`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from services.common.errors import CliError
from services.economics.metering import UsageRecord, read_record
from services.economics.prices import PriceTable, parse_price_table
from services.economics.spec import DataError, list_of, number
from services.economics.usage import DayUsage, parse_usage

DEFAULT_PRICES, REFERENCE_DAY = "prices.yaml", "deepseek_day6.json"
T = TypeVar("T")


class _DecimalLoader(yaml.SafeLoader):
    """SafeLoader that reads floats as exact Decimals (0.14 -> Decimal("0.14"))."""


def _yaml_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    raw = str(loader.construct_scalar(node)).replace("_", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise yaml.constructor.ConstructorError(None, None, f"not a finite number: {raw!r}",
                                                node.start_mark)
    return value


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _yaml_decimal)


def data_path(name: str) -> Path:
    """A file shipped in services/economics/data."""
    return Path(str(resources.files("services.economics.data").joinpath(name)))


def load_document(path: Path, what: str) -> Any:
    """JSON, YAML, or JSONL (a list with None for blank lines, so that index + 1 is the line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".jsonl":
        return [_json(line, f"{what} {path}: line {n}: ") if line.strip() else None
                for n, line in enumerate(text.splitlines(), 1)]
    if path.suffix.lower() == ".json":
        return _json(text, f"{what} {path}: ")
    try:
        return yaml.load(text, Loader=_DecimalLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise CliError(f"{what} {path}: not valid YAML or JSON: {problem}") from None


def load(path: Path, what: str, parse: Callable[[Any], T]) -> T:
    """The document in `path`, validated and built by `parse`."""
    doc = load_document(path, what)
    try:
        return parse(doc)
    except DataError as exc:
        raise CliError(f"{what} {path}: {exc}") from None


def load_usage(path: Path) -> DayUsage:
    return load(path, "usage file", parse_usage)


def load_prices(path: Path | None) -> PriceTable:
    """The price table in `path`, or the versioned default shipped with epserve."""
    path = path or data_path(DEFAULT_PRICES)
    return load(path, "price file", lambda doc: parse_price_table(doc, source=str(path)))


def load_curve(path: Path) -> list[Decimal]:
    """Hourly traffic weights: a list of numbers >= 0, or {weights: [...]}."""
    weights = list_of(number(), "must be a non-empty list of numbers")
    return load(path, "hourly curve", lambda doc: weights(
        doc.get("weights") if isinstance(doc, dict) else doc, "weights"))


def load_records(path: Path) -> list[UsageRecord]:
    """Usage records, one JSON object a line (metering.RECORD)."""
    return load(path, "usage records", lambda docs: [
        read_record(doc, f"line {n}") for n, doc in enumerate(docs, 1) if doc is not None])


def _json(text: str, where: str) -> Any:
    def reject(constant: str) -> Any:
        raise CliError(f"{where}{constant} is not a valid number")

    try:
        return json.loads(text, parse_float=Decimal, parse_constant=reject)
    except json.JSONDecodeError as exc:
        raise CliError(f"{where}not valid JSON: {exc}") from None
