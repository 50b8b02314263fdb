"""The field-spec validator every economics input file goes through (services/economics/spec.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.economics import spec
from services.economics.prices import PRICE_TABLE
from services.economics.reproduce import REFERENCE
from services.economics.spec import DataError, Obj, Opt, count, list_of, map_of, number, one_of
from services.economics.usage import ROW as USAGE_ROW
from services.economics.usage import USAGE

ROW = Obj({"name": spec.text, "size": count(1), "kind": Opt(one_of("a", "b"), "a")})
DOC = Obj({"rows": list_of(ROW, "must list at least one row"),
           "by_name": Opt(map_of(Obj({"price": number()}), "must name one")),
           "note": Opt(spec.text)})


def error(reader, value, path: str = "") -> DataError:
    with pytest.raises(DataError) as err:
        reader(value, path)
    return err.value


def test_reads_every_declared_field_with_defaults():
    assert DOC({"rows": [{"name": " x ", "size": 2}], "extra": "ignored"}, "") == {
        "rows": [{"name": "x", "size": 2, "kind": "a"}], "by_name": None, "note": None}
    # null is the same as absent
    assert ROW({"name": "y", "size": "3", "kind": None}, "")["kind"] == "a"


@pytest.mark.parametrize(
    ("value", "path", "problem"),
    [
        ([], "", "must be an object, got a list"),
        ({}, "rows", "is required"),
        ({"rows": []}, "rows", "must list at least one row"),
        ({"rows": "x"}, "rows", "must be a list, got string 'x'"),
        ({"rows": [{"size": 1}]}, "rows[0].name", "is required"),
        ({"rows": [{"name": 5, "size": 1}]}, "rows[0].name",
         "must be a non-empty string, got int 5"),
        ({"rows": [{"name": "x", "size": 0}]}, "rows[0].size", "must be an integer >= 1, got 0"),
        ({"rows": [{"name": "x", "size": 1, "kind": "c"}]}, "rows[0].kind",
         "must be one of a, b, got 'c'"),
        ({"rows": [{"name": "x", "size": 1}], "by_name": {}}, "by_name", "must name one"),
        ({"rows": [{"name": "x", "size": 1}], "by_name": {"m": {"price": -1}}},
         "by_name.m.price", "must be >= 0, got -1"),
    ],
)
def test_errors_name_the_field(value, path, problem):
    err = error(DOC, value)
    assert (err.path, err.problem) == (path, problem)
    assert str(err) == (f"{path}: {problem}" if path else problem)


def test_unknown_keys_can_be_rejected():
    strict = Obj({"a": count()}, unknown="unknown field; expected a")
    assert error(strict, {"a": 1, "b": 2}, "x").path == "x.b"


def test_numbers_are_exact_decimals():
    read = number()
    assert read(Decimal("0.14"), "") == Decimal("0.14")
    assert read(" 2.19 ", "") == Decimal("2.19")
    assert read(0.1, "") == Decimal("0.1")  # a Python float is read as its literal
    assert read(3, "") == 3
    assert error(read, True, "p").problem == "must be a number, got boolean True"
    assert error(read, "many", "p").problem == "must be a number, got 'many'"
    assert error(read, "NaN", "p").problem == "must be a finite number, got 'NaN'"
    assert error(read, None, "p").problem == "must be a number, got null"
    assert number(None)(-5, "") == -5


def test_counts_are_whole():
    assert count()(Decimal("608000000000.0"), "") == 608_000_000_000
    whole = "must be a whole number, got Decimal('1.5')"
    assert error(count(), Decimal("1.5"), "n").problem == whole
    assert error(count(), -1, "n").problem == "must be an integer >= 0, got -1"


def test_every_input_file_is_read_by_a_schema():
    # One mechanism: the price table, the usage file and DeepSeek's published day are all Obj
    # schemas (the day is then rewritten into USAGE).
    assert all(isinstance(schema, Obj) for schema in (PRICE_TABLE, USAGE, REFERENCE))
    assert error(PRICE_TABLE, {"models": {"m": {"output": 1}}}).path == "models.m.input_cache_hit"
    assert error(USAGE_ROW, {"model": "m"}, "hourly_tokens[3]").path == "hourly_tokens[3].from"
