"""Decode KV admission: whole-life reservations, NeverFits, release."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.kv_budget import KVBudget, NeverFits


@pytest.mark.parametrize("total, size", [(0, 64), (4, 0), (-1, 4)])
def test_sizes_must_be_positive(total, size):
    with pytest.raises(ValueError, match="must be > 0"):
        KVBudget(total, size)


@pytest.mark.parametrize("prompt, max_tokens, context, blocks", [
    (1, 1, 1000, 1),
    (63, 1, 1000, 1),
    (63, 2, 1000, 2),
    (64, 64, 1000, 2),
    (100, 28, 1000, 2),
    (100, 29, 1000, 3),
    (10, 10_000, 512, 8),  # capped by the context: 512 tokens = 8 blocks
    (500, 500, 513, 9),
])
def test_blocks_needed_rounds_up_and_is_capped_by_context(prompt, max_tokens, context, blocks):
    assert KVBudget(100, 64).blocks_needed(prompt, max_tokens, context) == blocks


def test_reserve_until_full_then_wait():
    b = KVBudget(10, 4)
    assert b.free_blocks == 10 and b.reserved_blocks == 0
    assert b.try_reserve("a", 6) is True
    assert b.try_reserve("b", 4) is True
    assert (b.reserved_blocks, b.free_blocks) == (10, 0)
    assert b.try_reserve("c", 1) is False
    assert not b.holds("c"), "a refused reservation holds nothing"
    assert b.holds("a") and b.holds("b")


def test_release_frees_exactly_that_reservation():
    b = KVBudget(10, 4)
    b.try_reserve("a", 6)
    b.try_reserve("b", 3)
    b.release("a")
    assert (b.reserved_blocks, b.free_blocks) == (3, 7)
    assert not b.holds("a")
    assert b.try_reserve("c", 7) is True
    b.release("a")  # twice, and unknown ids: no effect
    b.release("zzz")
    assert b.reserved_blocks == 10


def test_never_fits_even_when_empty():
    b = KVBudget(8, 64)
    with pytest.raises(NeverFits, match="needs 9 KV blocks; this instance has 8"):
        b.try_reserve("big", 9)
    assert b.try_reserve("exact", 8) is True


def test_never_fits_is_raised_even_while_full():
    b = KVBudget(8, 64)
    b.try_reserve("a", 8)
    with pytest.raises(NeverFits):
        b.try_reserve("big", 9)
    assert isinstance(NeverFits("x"), ValueError)


def test_double_reservation_is_a_bug():
    b = KVBudget(8, 64)
    b.try_reserve("a", 1)
    with pytest.raises(ValueError, match="a already holds a reservation"):
        b.try_reserve("a", 1)
    assert b.reserved_blocks == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 12), st.booleans()),
                max_size=40))
def test_reservations_never_exceed_the_total(ops):
    b = KVBudget(10, 16)
    model: dict[str, int] = {}
    for rid, blocks, release in ops:
        if release:
            b.release(rid)
            model.pop(rid, None)
            continue
        if rid in model:
            with pytest.raises(ValueError):
                b.try_reserve(rid, blocks)
        elif blocks > 10:
            with pytest.raises(NeverFits):
                b.try_reserve(rid, blocks)
        else:
            fits = blocks <= 10 - sum(model.values())
            assert b.try_reserve(rid, blocks) is fits
            if fits:
                model[rid] = blocks
        assert b.reserved_blocks == sum(model.values()) <= 10
        assert b.free_blocks == 10 - b.reserved_blocks
