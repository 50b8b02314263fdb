"""Decode token-stream checker: seq 0, 1, 2, ... with no gap, repeat or overrun."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.router.sequence import SequenceError, TokenSequenceChecker


def test_in_order_stream_is_accepted_and_counted():
    c = TokenSequenceChecker(max_tokens=3)
    for seq, tok in enumerate([7, 0, 9]):
        c.accept(seq, tok)
    assert c.received == 3
    c.check_finished(3)


def test_gap():
    c = TokenSequenceChecker()
    c.accept(0, 1)
    with pytest.raises(SequenceError, match="gap in the token stream: expected seq 1, got 2"):
        c.accept(2, 1)
    assert c.received == 1


def test_first_token_must_be_seq_zero():
    with pytest.raises(SequenceError, match="expected seq 0, got 1"):
        TokenSequenceChecker().accept(1, 5)


def test_duplicate():
    c = TokenSequenceChecker()
    c.accept(0, 1)
    c.accept(1, 1)
    with pytest.raises(SequenceError, match=r"duplicate token seq 0 \(already have 0\.\.1\)"):
        c.accept(0, 1)
    with pytest.raises(SequenceError, match="duplicate token seq 1"):
        c.accept(1, 1)
    assert c.received == 2


def test_beyond_max_tokens():
    c = TokenSequenceChecker(max_tokens=2)
    c.accept(0, 1)
    c.accept(1, 1)
    with pytest.raises(SequenceError, match="token seq 2 beyond max_tokens 2"):
        c.accept(2, 1)
    assert c.received == 2


def test_no_bound_without_max_tokens():
    c = TokenSequenceChecker()
    for seq in range(1000):
        c.accept(seq, 3)
    assert c.received == 1000


def test_negative_token_id():
    c = TokenSequenceChecker()
    with pytest.raises(SequenceError, match="negative token id -1 at seq 0"):
        c.accept(0, -1)
    assert c.received == 0


@pytest.mark.parametrize("count", [0, 2, 4])
def test_finished_count_must_match(count):
    c = TokenSequenceChecker()
    for seq in range(3):
        c.accept(seq, 0)
    with pytest.raises(
            SequenceError,
            match=f"decode finished with completion_tokens={count} but 3 tokens arrived"):
        c.check_finished(count)


def test_finished_with_no_tokens():
    TokenSequenceChecker().check_finished(0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=12))
def test_accepts_exactly_the_in_order_prefix(seqs):
    c = TokenSequenceChecker()
    expected = 0
    for seq in seqs:
        if seq == expected:
            c.accept(seq, 0)
            expected += 1
        else:
            with pytest.raises(SequenceError):
                c.accept(seq, 0)
        assert c.received == expected
