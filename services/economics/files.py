"""Reading the economics package's input files: JSON or YAML, numbers as exact decimals.

Every problem is one CliError naming the file and the field (`usage file day.json:
hourly_tokens[3].output_total: must be an integer >= 0, got -5`). The parse functions of the
package build the domain objects from the documents read here; the CLI (services/cli) and the
ledger service read their files through this module.
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
from services.economics.prices import PriceTable, parse_price_table
from services.economics.reproduce import reference_usage
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
    """A JSON or YAML document, numbers read as exact decimals."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".jsonl":  # per-request records: metering.aggregate_records
        raise CliError(f"{what} {path}: JSONL usage records are not read; a usage file carries "
                       "them folded into hourly_tokens rows")
    return read_document(text, path.suffix, f"{what} {path}: ")


def read_document(text: str, suffix: str, where: str) -> Any:
    """The document in `text` (JSON when `suffix` is .json, else YAML); `where` prefixes errors."""
    if suffix.lower() == ".json":
        return _json(text, where)
    try:
        return yaml.load(text, Loader=_DecimalLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise CliError(f"{where}not valid YAML or JSON: {problem}") from None


def load(path: Path, what: str, parse: Callable[[Any], T]) -> T:
    """The document in `path`, validated and built by `parse`."""
    doc = load_document(path, what)
    try:
        return parse(doc)
    except DataError as exc:
        raise CliError(f"{what} {path}: {exc}") from None


def load_usage(path: Path) -> DayUsage:
    return load(path, "usage file", parse_usage)


def load_reference(path: Path | None) -> DayUsage:
    """DeepSeek's published day (reproduce.reference_usage), by default the shipped copy."""
    return load(path or data_path(REFERENCE_DAY), "usage file", reference_usage)


def load_prices(path: Path | None) -> PriceTable:
    """The price table in `path`, or the versioned default shipped with epserve."""
    path = path or data_path(DEFAULT_PRICES)
    return load(path, "price file", lambda doc: parse_price_table(doc, source=str(path)))


def prices_from_text(text: str, suffix: str, source: str) -> PriceTable:
    """A price table kept as text (the ledger stores the one it bills with)."""
    doc = read_document(text, suffix, f"price table {source}: ")
    try:
        return parse_price_table(doc, source=source)
    except DataError as exc:
        raise CliError(f"price table {source}: {exc}") from None


def load_curve(path: Path) -> list[Decimal]:
    """Hourly traffic weights: a list of numbers >= 0, one per hour from the window start."""
    weights = list_of(number(), "must be a non-empty list of numbers")
    return load(path, "hourly curve", lambda doc: weights(doc, "weights"))


def _json(text: str, where: str) -> Any:
    def reject(constant: str) -> Any:
        raise CliError(f"{where}{constant} is not a valid number")

    try:
        return json.loads(text, parse_float=Decimal, parse_constant=reject)
    except json.JSONDecodeError as exc:
        raise CliError(f"{where}not valid JSON: {exc}") from None
