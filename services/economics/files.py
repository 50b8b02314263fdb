"""Reading usage and price files (the I/O edge): JSON or YAML, numbers as exact decimals.

Parse problems become CliError with the file and the field path, e.g.
`usage file day.json: tokens.output_total: must be an integer >= 0, got -5`.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import CliError
from services.economics.fields import DataError
from services.economics.prices import PriceTable
from services.economics.prices_parse import parse_price_table
from services.economics.usage import DayUsage
from services.economics.usage_parse import parse_usage

DATA_PACKAGE = "services.economics.data"
DEFAULT_PRICES = "prices.yaml"
REFERENCE_DAY = "deepseek_day6.json"


class _DecimalSafeLoader(yaml.SafeLoader):
    """SafeLoader that reads floats as exact Decimals ("0.14" -> Decimal("0.14"))."""


def _yaml_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    raw = str(loader.construct_scalar(node)).replace("_", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise yaml.constructor.ConstructorError(
            None, None, f"not a finite number: {raw!r}", node.start_mark
        )
    return value


_DecimalSafeLoader.add_constructor("tag:yaml.org,2002:float", _yaml_decimal)


def data_path(name: str) -> Path:
    return Path(str(resources.files(DATA_PACKAGE).joinpath(name)))


def load_document(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        return _load_json(text, path, what)
    try:
        return yaml.load(text, Loader=_DecimalSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise CliError(f"{what} {path}: not valid YAML or JSON: {_one_line(exc)}") from None


def load_usage(path: Path) -> DayUsage:
    doc = load_document(path, "usage file")
    try:
        return parse_usage(doc)
    except DataError as exc:
        raise CliError(f"usage file {path}: {exc}") from None


def load_prices(path: Path | None) -> PriceTable:
    """The price table in `path`, or the versioned default shipped with epserve."""
    path = path or data_path(DEFAULT_PRICES)
    doc = load_document(path, "price file")
    try:
        return parse_price_table(doc, source=str(path))
    except DataError as exc:
        raise CliError(f"price file {path}: {exc}") from None


def _load_json(text: str, path: Path, what: str) -> Any:
    def reject(constant: str) -> Any:
        raise CliError(f"{what} {path}: {constant} is not a valid number")

    try:
        return json.loads(text, parse_float=Decimal, parse_constant=reject)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} {path}: not valid JSON: {exc}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
