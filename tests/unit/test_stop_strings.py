"""Stop strings matched on streamed text: held back while undecided, cut before the match."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.engine.stop_strings import StopStrings


def stream(pieces: list[str], stop: list[str]) -> tuple[list[str], str, str | None]:
    m = StopStrings(stop)
    shown = [m.push(p) for p in pieces]
    return shown, "".join(shown) + m.flush(), m.matched


def test_no_stop_strings_passes_everything_at_once():
    assert stream(["ab", "c"], []) == (["ab", "c"], "abc", None)


def test_text_is_cut_right_before_the_stop_string():
    shown, text, matched = stream(["Hello", " wor", "ld. Bye"], ["world"])
    assert text == "Hello " and matched == "world"
    assert shown[-1] == ""  # nothing after the match, and not the match itself


def test_a_possible_start_of_a_stop_string_is_held_back_until_decided():
    m = StopStrings(["\n\n"])
    assert m.push("line\n") == "line"  # "\n" may begin "\n\n"
    assert m.push("x") == "\nx"  # it did not
    assert m.push("\n") == "" and m.push("\n") == ""
    assert m.matched == "\n\n" and m.push("more") == ""


def test_held_back_text_comes_out_at_the_end():
    assert stream(["abc", "EN"], ["END"]) == (["abc", ""], "abcEN", None)


def test_the_earliest_match_wins_and_at_one_place_the_longest():
    assert stream(["xxABCD"], ["CD", "AB"])[1] == "xx"
    assert stream(["xxABCD"], ["AB", "ABC"])[2] == "ABC"


def test_a_match_spanning_many_pieces():
    assert stream(list("one STOP two"), ["STOP"])[1] == "one "


@given(st.lists(st.text(alphabet="ab\n", max_size=4), max_size=12),
       st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), min_size=1, max_size=3))
def test_streamed_equals_matching_the_whole_text(pieces, stop):
    """However the text is split, the result is the whole text cut at its first stop string,
    and what was shown along the way is a prefix of it."""
    whole = "".join(pieces)
    hits = [whole.find(s) for s in stop if s in whole]
    expect = whole[:min(hits)] if hits else whole
    shown, text, matched = stream(pieces, stop)
    assert text == expect and (matched is not None) == bool(hits)
    assert expect.startswith("".join(shown))


@pytest.mark.parametrize("stop", [[""], []])
def test_empty_stop_strings_match_nothing(stop):
    assert stream(["abc"], stop)[1] == "abc"
