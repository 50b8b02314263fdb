"""Router admission: a hard in-flight bound, duplicate ids, draining and release."""

from __future__ import annotations

import pytest

from services.router.admission import (
    Admission,
    AdmissionRejected,
    AtCapacity,
    Draining,
    DuplicateRequest,
)


@pytest.mark.parametrize("bound", [0, -3])
def test_bound_must_be_positive(bound):
    with pytest.raises(ValueError, match="max_inflight must be >= 1"):
        Admission(bound)


def test_admits_up_to_the_bound_then_rejects_at_once():
    a = Admission(2)
    a.admit("a")
    a.admit("b")
    assert a.in_flight == 2
    with pytest.raises(AtCapacity, match=r"router at capacity \(2 in flight\)"):
        a.admit("c")
    assert a.in_flight == 2, "a rejected request is not counted"


def test_release_makes_room():
    a = Admission(1)
    a.admit("a")
    with pytest.raises(AtCapacity):
        a.admit("b")
    a.release("a")
    assert a.in_flight == 0
    a.admit("b")
    assert a.in_flight == 1


def test_duplicate_id_is_refused_even_with_room():
    a = Admission(5)
    a.admit("dup")
    with pytest.raises(DuplicateRequest, match="request dup is already in flight"):
        a.admit("dup")
    assert a.in_flight == 1
    a.release("dup")
    a.admit("dup")  # the id may be reused once the first request left


def test_duplicate_is_reported_before_capacity():
    a = Admission(1)
    a.admit("x")
    with pytest.raises(DuplicateRequest):
        a.admit("x")


def test_release_of_unknown_or_released_id_is_ignored():
    a = Admission(2)
    a.admit("a")
    a.release("nope")
    a.release("a")
    a.release("a")
    assert a.in_flight == 0


def test_draining_refuses_new_and_lets_in_flight_finish():
    a = Admission(3)
    a.admit("a")
    assert not a.draining
    a.start_draining()
    assert a.draining
    with pytest.raises(Draining, match="draining"):
        a.admit("b")
    assert a.in_flight == 1
    a.release("a")
    assert a.in_flight == 0
    with pytest.raises(Draining):
        a.admit("c")


def test_draining_is_reported_before_duplicate_and_capacity():
    a = Admission(1)
    a.admit("a")
    a.start_draining()
    with pytest.raises(Draining):
        a.admit("a")
    with pytest.raises(Draining):
        a.admit("b")


def test_all_rejections_share_a_base():
    for cls in (AtCapacity, Draining, DuplicateRequest):
        assert issubclass(cls, AdmissionRejected)
