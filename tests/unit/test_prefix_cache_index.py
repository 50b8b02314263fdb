"""PageIndex: residency, sizes, and prefix-closed LRU eviction (against a naive oracle)."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from services.prefix_cache.index import PageIndex
from services.prefix_cache.keys import NO_PARENT


def k(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "little")).digest()


def chain(index: PageIndex, ids: list[int], nbytes: int = 10, start: float = 0.0) -> None:
    parent = NO_PARENT
    for i, n in enumerate(ids):
        index.add(k(n), parent, nbytes, start + i)
        parent = k(n)


def evict(index: PageIndex, budget: int) -> list[bytes]:
    out = index.victims(budget)
    for key in out:
        assert index.children_count(key) == 0, "a victim with a resident child"
        index.remove(key)
    return out


def test_basics():
    index = PageIndex()
    chain(index, [1, 2, 3])
    assert len(index) == 3 and index.total_bytes == 30
    assert k(2) in index and k(9) not in index
    assert index.parent(k(2)) == k(1) and index.parent(k(1)) == NO_PARENT
    assert index.parent(k(9)) is None
    assert [index.children_count(k(n)) for n in (1, 2, 3)] == [1, 1, 0]
    assert index.remove(k(3)) and not index.remove(k(3))
    assert index.total_bytes == 20 and index.children_count(k(2)) == 0
    assert not index.touch(k(3), 5.0)


def test_victims_do_not_remove():
    index = PageIndex()
    chain(index, [1, 2, 3])
    assert index.victims(0) == [k(3), k(2), k(1)]
    assert len(index) == 3
    assert index.victims(30) == []
    assert index.victims(25) == [k(3)]


def test_leaves_only_even_when_the_parent_is_older():
    index = PageIndex()
    chain(index, [1, 2], start=0.0)  # 1 is the least recently used page, but has a child
    chain(index, [10, 11], start=100.0)
    assert index.victims(30) == [k(2)]
    # Evicting 2 makes 1 a leaf, and it is older than 11.
    assert index.victims(20) == [k(2), k(1)]


def test_touch_reorders():
    index = PageIndex()
    chain(index, [1], start=0.0)
    chain(index, [2], start=1.0)
    index.touch(k(1), 5.0)
    assert index.victims(10) == [k(2)]
    index.touch(k(1), 0.5)  # last use never moves backwards
    assert index.victims(10) == [k(2)]
    assert index.last_use(k(1)) == 5.0


def test_children_counted_before_the_parent_arrives():
    index = PageIndex()
    index.add(k(2), k(1), 10, 0.0)  # a scan may meet the child first
    assert index.children_count(k(1)) == 1
    index.add(k(1), NO_PARENT, 10, 1.0)
    assert index.victims(10) == [k(2)]


def test_exclude_keeps_the_ancestors():
    index = PageIndex()
    chain(index, [1, 2, 3])
    chain(index, [7], start=10.0)
    assert index.victims(0, exclude={k(3)}) == [k(7)]


def test_re_add_replaces():
    index = PageIndex()
    chain(index, [1, 2])
    index.add(k(2), k(1), 25, 9.0)
    assert index.total_bytes == 35 and index.children_count(k(1)) == 1


def test_reconcile():
    index = PageIndex()
    chain(index, [1, 2, 3], start=0.0)
    index.add(k(4), k(3), 10, 50.0)  # written while the scan ran
    found = {k(1): (NO_PARENT, 10, 30.0), k(5): (NO_PARENT, 7, 20.0), k(6): (NO_PARENT, 7, 1.0)}
    index.reconcile(found, started=40.0, removed={k(6)})
    assert set(index) == {k(1), k(4), k(5)}  # 2 and 3 vanished from disk; 6 removed meanwhile
    assert index.last_use(k(1)) == 30.0
    assert index.total_bytes == 27


def test_many_touches_keep_the_heap_bounded():
    index = PageIndex()
    chain(index, [1, 2, 3])
    for t in range(1000):
        index.touch(k(3), 10.0 + t)
    assert len(index._leaves) <= 2 * len(index) + 65
    assert index.victims(20) == [k(3)]


def oracle_victims(pages: dict[bytes, tuple[bytes, int, float]], budget: int) -> list[bytes]:
    """The definition, naively: repeatedly take the least recently used leaf."""
    pages = dict(pages)
    total = sum(n for _, n, _ in pages.values())
    out = []
    while total > budget and pages:
        parents = {p for p, _, _ in pages.values()}
        leaves = [key for key in pages if key not in parents]
        victim = min(leaves, key=lambda key: pages[key][2])
        out.append(victim)
        total -= pages.pop(victim)[1]
    return out


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 40), st.integers(1, 100)),
    st.tuples(st.just("touch"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("evict"), st.integers(0, 2000), st.just(0)),
), max_size=120)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_property_prefix_closed_within_budget_and_lru(operations):
    index = PageIndex()
    model: dict[bytes, tuple[bytes, int, float]] = {}  # key -> (parent, nbytes, last use)
    parent_was_resident: dict[bytes, bool] = {}
    now = 0.0
    fresh = 0
    for op, a, b in operations:
        now += 1.0  # distinct times: the LRU order is unambiguous
        resident = sorted(model)
        if op == "add":
            # Pick a parent among resident pages (or none, or a page never added), like the
            # disk store with and without its parent check.
            if a % 5 == 0 or not resident:
                parent = NO_PARENT
            elif a % 7 == 0:
                parent = k(10_000 + a)  # never added: an orphan
            else:
                parent = resident[a % len(resident)]
            fresh += 1
            key = k(fresh)
            index.add(key, parent, b, now)
            model[key] = (parent, b, now)
            parent_was_resident[key] = parent in model
        elif op == "touch" and resident:
            key = resident[a % len(resident)]
            index.touch(key, now)
            model[key] = (model[key][0], model[key][1], now)
        elif op == "evict":
            expected = oracle_victims(model, a)
            assert evict(index, a) == expected
            for key in expected:
                del model[key]
            assert index.total_bytes <= a
        assert index.total_bytes == sum(n for _, n, _ in model.values())
        assert len(index) == len(model)
        for key, (parent, _, _) in model.items():
            if parent_was_resident[key]:
                assert parent in index, "a resident page lost its parent"
