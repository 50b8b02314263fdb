"""The one validator every input file goes through: a schema is a tree of field readers.

A reader is `(value, path) -> typed value` and raises DataError naming `path`, the field's place
in the document (`node_schedule[3].to`). Checks across fields belong to the builder of the
domain object, which raises DataError with the path too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

Reader = Callable[[Any, str], Any]


class DataError(ValueError):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path, self.problem = path, problem


def join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key


def kind(value: Any) -> str:
    """A value as messages name it: null, an object, a list, boolean True, string 'x', int 5."""
    if value is None or isinstance(value, Mapping | list | tuple):
        return "null" if value is None else "an object" if isinstance(value, Mapping) else "a list"
    name = "boolean" if isinstance(value, bool) else "string" if isinstance(value, str) else None
    return f"{name or type(value).__name__} {value!r}"


@dataclass(frozen=True)
class Opt:
    """An optional field: absent or null reads as `default`."""

    read: Reader
    default: Any = None


@dataclass(frozen=True)
class Obj:
    """A mapping read into a dict of every declared field (a reader, or an Opt); other keys
    are ignored, or rejected with the `unknown` message."""

    fields: Mapping[str, Reader | Opt]
    unknown: str | None = None

    def __call__(self, value: Any, path: str) -> dict[str, Any]:
        for key in mapping(value, path):
            if self.unknown and key not in self.fields:
                raise DataError(join(path, key), self.unknown)
        out = {}
        for key, field in self.fields.items():
            read = field.read if isinstance(field, Opt) else field
            if value.get(key) is not None:
                out[key] = read(value[key], join(path, key))
            elif isinstance(field, Opt):
                out[key] = field.default
            else:
                raise DataError(join(path, key), "is required")
        return out


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DataError(path, f"must be an object, got {kind(value)}")
    return value


def list_of(item: Reader, empty: str | None = None) -> Reader:
    """A list read entry by entry; `empty` is the complaint when it has none."""

    def read(value: Any, path: str) -> list[Any]:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise DataError(path, f"must be a list, got {kind(value)}")
        if empty and not value:
            raise DataError(path, empty)
        return [item(entry, join(path, i)) for i, entry in enumerate(value)]

    return read


def map_of(item: Reader, empty: str | None = None) -> Reader:
    """An object of name -> entry (models, for instance)."""

    def read(value: Any, path: str) -> dict[str, Any]:
        if empty and not mapping(value, path):
            raise DataError(path, empty)
        return {str(k): item(v, join(path, str(k))) for k, v in mapping(value, path).items()}

    return read


def text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, f"must be a non-empty string, got {kind(value)}")
    return value.strip()


def one_of(*choices: str) -> Reader:
    def read(value: Any, path: str) -> str:
        if (value := text(value, path)) not in choices:
            raise DataError(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return read


def number(minimum: Decimal | int | None = 0) -> Reader:
    """An exact decimal from an int, a Decimal or a numeric string. A float only comes from
    Python callers: its shortest repr is the literal they wrote (0.14, not its binary value)."""

    def read(value: Any, path: str) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | Decimal | float | str):
            raise DataError(path, f"must be a number, got {kind(value)}")
        try:
            result = Decimal(repr(value) if isinstance(value, float) else value)
        except InvalidOperation:
            raise DataError(path, f"must be a number, got {value!r}") from None
        if not result.is_finite():
            raise DataError(path, f"must be a finite number, got {value!r}")
        if minimum is not None and result < minimum:
            raise DataError(path, f"must be >= {minimum}, got {value!r}")
        return result

    return read


def count(minimum: int = 0) -> Reader:
    """A whole number; 608000000000.0 is accepted (JSON writers emit such), 1.5 is not."""

    def read(value: Any, path: str) -> int:
        if (result := number(None)(value, path)) != result.to_integral_value():
            raise DataError(path, f"must be a whole number, got {value!r}")
        if result < minimum:
            raise DataError(path, f"must be an integer >= {minimum}, got {value!r}")
        return int(result)

    return read
