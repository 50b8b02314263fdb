"""The router's instance view (eligibility, forgetting, describe) and instance choice."""

from __future__ import annotations

import pytest

from services.common.load import InstanceLoad
from services.router.choice import InstanceChooser, NoInstance
from services.router.instances import (
    DECODE,
    PREFILL,
    InstanceReport,
    InstanceView,
    decode_loads,
    prefill_loads,
)


def report(instance_id: str, role: str = DECODE, state: str = "serving", **kw) -> InstanceReport:
    return InstanceReport(instance_id, role, f"{instance_id}:50051", state, InstanceLoad(**kw))


def view_of(*reports: InstanceReport, now: float = 100.0, dead_after_s: float = 2.0):
    v = InstanceView(dead_after_s=dead_after_s)
    for r in reports:
        v.observe(r, now)
    return v


# -- InstanceView ------------------------------------------------------------------------------

@pytest.mark.parametrize("dead_after_s", [0, -1.0])
def test_dead_after_must_be_positive(dead_after_s):
    with pytest.raises(ValueError, match="dead_after_s must be > 0"):
        InstanceView(dead_after_s)


def test_forget_after_defaults_to_twenty_dead_windows():
    assert InstanceView(1.5).forget_after_s == 30.0
    assert InstanceView(1.5, forget_after_s=4.0).forget_after_s == 4.0


@pytest.mark.parametrize("state", ["starting", "draining", "dead"])
def test_only_serving_instances_are_eligible(state):
    v = view_of(report("d0", state=state), report("d1"))
    assert [i.instance_id for i in v.eligible(DECODE, 100.0)] == ["d1"]
    assert [i.instance_id for i in v.known(DECODE)] == ["d0", "d1"]


def test_silence_makes_an_instance_ineligible_exactly_after_dead_after():
    v = view_of(report("d0"), now=100.0, dead_after_s=2.0)
    assert [i.instance_id for i in v.eligible(DECODE, 102.0)] == ["d0"]  # boundary: still in
    assert v.eligible(DECODE, 102.01) == []
    v.observe(report("d0"), 102.5)  # a new heartbeat revives it
    assert [i.instance_id for i in v.eligible(DECODE, 103.0)] == ["d0"]


def test_eligibility_uses_receipt_time_not_sent_time():
    v = InstanceView(2.0)
    v.observe(report("d0"), now=50.0)
    assert v.get("d0").heard_at == 50.0


def test_roles_are_kept_apart_and_sorted_by_id():
    v = view_of(report("d2"), report("p1", PREFILL), report("d0"), report("p0", PREFILL))
    assert [i.instance_id for i in v.eligible(DECODE, 100.0)] == ["d0", "d2"]
    assert [i.instance_id for i in v.eligible(PREFILL, 100.0)] == ["p0", "p1"]


def test_other_roles_and_empty_ids_are_ignored():
    v = view_of(report("r0", role="router"), report("x", role="expert_worker"),
                report("", role=DECODE))
    assert v.get("r0") is None and v.get("x") is None and v.get("") is None
    assert v.known(DECODE) == [] and v.known(PREFILL) == []


def test_later_heartbeat_replaces_the_report():
    v = view_of(report("d0", running_requests=1))
    v.observe(report("d0", state="draining", running_requests=5), 101.0)
    inst = v.get("d0")
    assert inst.report.state == "draining" and inst.report.load.running_requests == 5
    assert inst.heard_at == 101.0
    assert inst.endpoint == "d0:50051"
    assert len(v.known(DECODE)) == 1


def test_silent_instances_are_forgotten_on_the_next_observe():
    v = InstanceView(dead_after_s=1.0, forget_after_s=10.0)
    v.observe(report("old"), 0.0)
    v.observe(report("new"), 10.0)
    assert v.get("old") is not None, "exactly forget_after_s is not yet forgotten"
    v.observe(report("new"), 10.5)
    assert v.get("old") is None
    assert [i.instance_id for i in v.known(DECODE)] == ["new"]


def test_describe_all_eligible():
    v = view_of(report("d0"), report("d1"))
    assert v.describe(DECODE, 100.0) == "2 of 2 decode instances eligible"


def test_describe_gives_each_ineligible_reason():
    v = InstanceView(dead_after_s=2.0)
    v.observe(report("d0", state="draining"), 100.0)
    v.observe(report("d1"), 96.9)
    v.observe(report("d2"), 100.0)
    assert v.describe(DECODE, 100.0) == (
        "1 of 3 decode instances eligible (d0: draining, d1: silent 3.1s)")


def test_describe_with_none_known():
    assert InstanceView(1.0).describe(PREFILL, 0.0) == "0 of 0 prefill instances eligible"


def test_loads_for_the_balancers():
    v = view_of(report("p0", PREFILL, queued_tokens=7, attention_cost=-3.0),
                report("d0", kv_blocks_in_use=4, kv_blocks_total=0, running_requests=2))
    (p,) = prefill_loads(v.known(PREFILL))
    assert (p.instance_id, p.queued_tokens, p.attention_cost) == ("p0", 7, 0.0)
    (d,) = decode_loads(v.known(DECODE))
    assert (d.kv_blocks_in_use, d.kv_blocks_total, d.running_requests) == (4, 1, 2)


# -- InstanceChooser ---------------------------------------------------------------------------

def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        InstanceChooser("random")


def test_round_robin_cycles_in_id_order_per_role():
    v = view_of(report("d1"), report("d0"), report("d2"), report("p0", PREFILL),
                report("p1", PREFILL))
    c = InstanceChooser("rr")
    decode = v.eligible(DECODE, 100.0)
    prefill = v.eligible(PREFILL, 100.0)
    got = [c.choose_decode(decode, 10, 10).instance_id for _ in range(4)]
    assert got == ["d0", "d1", "d2", "d0"]
    # the prefill cursor is independent of the decode one
    assert [c.choose_prefill(prefill, 10).instance_id for _ in range(3)] == ["p0", "p1", "p0"]


def test_round_robin_skips_avoided_decode_instances():
    decode = view_of(report("d0"), report("d1"), report("d2")).eligible(DECODE, 100.0)
    c = InstanceChooser("rr")
    picks = {c.choose_decode(decode, 10, 10, avoid={"d1"}).instance_id for _ in range(6)}
    assert picks == {"d0", "d2"}


@pytest.mark.parametrize("mode", ["rr", "load"])
def test_decode_with_nothing_serving(mode):
    with pytest.raises(NoInstance, match="^no decode instance is serving$"):
        InstanceChooser(mode).choose_decode([], 10, 10)


@pytest.mark.parametrize("mode", ["rr", "load"])
def test_decode_never_repeats_an_avoided_instance(mode):
    decode = view_of(report("d1"), report("d0")).eligible(DECODE, 100.0)
    with pytest.raises(NoInstance) as exc_info:
        InstanceChooser(mode).choose_decode(decode, 10, 10, avoid={"d1", "d0"})
    assert str(exc_info.value) == "no other decode instance to try (d0, d1 refused or failed)"


@pytest.mark.parametrize("mode", ["rr", "load"])
def test_prefill_with_nothing_serving(mode):
    with pytest.raises(NoInstance, match="^no prefill instance is serving$"):
        InstanceChooser(mode).choose_prefill([], 10, avoid={"p0"})


@pytest.mark.parametrize("mode", ["rr", "load"])
def test_prefill_avoids_when_it_can_and_repeats_when_it_must(mode):
    prefill = view_of(report("p0", PREFILL), report("p1", PREFILL)).eligible(PREFILL, 100.0)
    c = InstanceChooser(mode)
    for _ in range(3):
        assert c.choose_prefill(prefill, 10, avoid={"p0"}).instance_id == "p1"
    only = prefill[:1]
    assert c.choose_prefill(only, 10, avoid={"p0"}).instance_id == "p0"


def test_load_mode_decode_prefers_free_kv():
    decode = view_of(report("d0", kv_blocks_in_use=90, kv_blocks_total=100),
                     report("d1", kv_blocks_in_use=10, kv_blocks_total=100)
                     ).eligible(DECODE, 100.0)
    assert InstanceChooser("load").choose_decode(decode, 64, 16).instance_id == "d1"


def test_load_mode_decode_treats_unreported_capacity_as_full():
    decode = view_of(report("a", kv_blocks_total=0),
                     report("b", kv_blocks_in_use=50, kv_blocks_total=100)
                     ).eligible(DECODE, 100.0)
    assert InstanceChooser("load").choose_decode(decode, 64, 16).instance_id == "b"


def test_load_mode_decode_counts_what_it_dispatched_until_finished():
    decode = view_of(report("d0", kv_blocks_total=100),
                     report("d1", kv_blocks_total=100)).eligible(DECODE, 100.0)
    c = InstanceChooser("load")
    first = c.choose_decode(decode, 640, 0)
    assert first.instance_id == "d0"  # tie -> lower id
    c.decode_dispatched("d0", "r1", 640, 0)
    assert c.choose_decode(decode, 640, 0).instance_id == "d1"
    c.decode_finished("r1")
    assert c.choose_decode(decode, 640, 0).instance_id == "d0"
    assert c.decode_balancer.unreported == 0


def test_load_mode_prefill_prefers_the_shorter_queue_and_tracks_dispatches():
    prefill = view_of(report("p0", PREFILL, queued_tokens=5000, attention_cost=5000.0 ** 2),
                      report("p1", PREFILL)).eligible(PREFILL, 100.0)
    c = InstanceChooser("load")
    assert c.choose_prefill(prefill, 100).instance_id == "p1"
    even = view_of(report("p0", PREFILL), report("p1", PREFILL)).eligible(PREFILL, 100.0)
    assert c.choose_prefill(even, 100).instance_id == "p0"
    c.prefill_dispatched("p0", "r1", 100)
    assert c.choose_prefill(even, 100).instance_id == "p1"
    c.prefill_finished("r1")
    assert c.choose_prefill(even, 100).instance_id == "p0"


def test_load_mode_returns_the_instance_object_itself():
    decode = view_of(report("d0")).eligible(DECODE, 100.0)
    assert InstanceChooser("load").choose_decode(decode, 1, 1) is decode[0]


def test_rr_mode_still_keeps_the_ledgers():
    c = InstanceChooser("rr")
    c.decode_dispatched("d0", "r", 10, 10)
    c.prefill_dispatched("p0", "r", 10)
    assert c.decode_balancer.unreported == 1 and c.prefill_balancer.unreported == 1
    c.decode_finished("r")
    c.prefill_finished("r")
    assert c.decode_balancer.unreported == 0 and c.prefill_balancer.unreported == 0
