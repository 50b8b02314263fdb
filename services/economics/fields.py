"""Path-aware readers for parsed JSON/YAML documents: every error names the offending field.

A document arrives as plain dicts/lists with numbers as int or Decimal (the file loader reads
decimals exactly). The readers here turn one field into a typed value or raise DataError whose
message starts with the field's path, e.g. `tokens.output_total: must be an integer >= 0`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any


class DataError(ValueError):
    """A usage or price document that cannot be used; `path` names the field."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DataError(path, f"must be an object, got {_kind(value)}")
    return value


def sequence(value: Any, path: str) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise DataError(path, f"must be a list, got {_kind(value)}")
    return value


def required(doc: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in doc or doc[key] is None:
        raise DataError(join(path, key), "is required")
    return doc[key]


def text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, f"must be a non-empty string, got {_kind(value)}")
    return value.strip()


def decimal(value: Any, path: str, *, minimum: Decimal | None = Decimal(0)) -> Decimal:
    """An exact decimal from an int, a Decimal or a numeric string (floats go through repr)."""
    if isinstance(value, bool):
        raise DataError(path, f"must be a number, got {_kind(value)}")
    if isinstance(value, int | Decimal):
        number = Decimal(value)
    elif isinstance(value, float):
        # A float only reaches us from a caller building documents in Python; its shortest
        # repr is the literal the caller wrote (0.14 -> "0.14"), not its binary expansion.
        number = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise DataError(path, f"must be a number, got {value!r}") from None
    else:
        raise DataError(path, f"must be a number, got {_kind(value)}")
    if not number.is_finite():
        raise DataError(path, f"must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise DataError(path, f"must be >= {minimum}, got {value!r}")
    return number


def integer(value: Any, path: str, *, minimum: int = 0) -> int:
    """A whole number; 608000000000.0 is accepted (JSON writers emit such), 1.5 is not."""
    number = decimal(value, path, minimum=None)
    if number != number.to_integral_value():
        raise DataError(path, f"must be a whole number, got {value!r}")
    result = int(number)
    if result < minimum:
        raise DataError(path, f"must be an integer >= {minimum}, got {value!r}")
    return result


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"{type(value).__name__} {value!r}"
