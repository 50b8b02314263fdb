"""Scheduler membership from heartbeats: liveness, revival, restore and expert endpoints."""

from __future__ import annotations

import pytest

from services.protos_gen.epserve.v1 import control_pb2 as pb
from services.scheduler.membership import HeartbeatRejected, Membership


def hb(instance_id: str = "d0", role: int = pb.ROLE_DECODE, state: int = pb.STATE_SERVING,
       **kw) -> pb.Heartbeat:
    kw.setdefault("endpoint", f"{instance_id}:50051")
    return pb.Heartbeat(instance_id=instance_id, role=role, state=state, **kw)


def worker(instance_id: str, rank: int, version: int = 1, state: int = pb.STATE_SERVING,
           endpoint: str | None = None) -> pb.Heartbeat:
    return hb(instance_id, pb.ROLE_EXPERT_WORKER, state, rank=rank, placement_version=version,
              endpoint=endpoint if endpoint is not None else f"{instance_id}:6000")


@pytest.mark.parametrize("dead_after_s", [0, -1])
def test_dead_after_must_be_positive(dead_after_s):
    with pytest.raises(ValueError, match="dead_after_s must be > 0"):
        Membership(dead_after_s)


# -- observe -----------------------------------------------------------------------------------

def test_first_heartbeat_adds_a_member():
    m = Membership(1.5)
    assert m.observe(hb("d0"), now=10.0) is True
    assert len(m) == 1 and "d0" in m and "d1" not in m
    member = m.get("d0")
    assert member.state == pb.STATE_SERVING
    assert (member.first_seen, member.last_seen) == (10.0, 10.0)
    assert member.last.endpoint == "d0:50051"
    assert m.heard_at("d0") == 10.0


def test_unset_state_means_starting():
    m = Membership(1.0)
    m.observe(hb("d0", state=pb.STATE_UNSPECIFIED), 0.0)
    assert m.get("d0").state == pb.STATE_STARTING


def test_repeat_heartbeat_is_not_a_change_but_refreshes():
    m = Membership(1.0)
    m.observe(hb("d0", load=pb.InstanceLoad(running_requests=1)), 0.0)
    assert m.observe(hb("d0", load=pb.InstanceLoad(running_requests=9), sent_at=5.0), 0.5) \
        is False, "load figures alone are not a membership change"
    member = m.get("d0")
    assert member.last.load.running_requests == 9, "the latest heartbeat is kept"
    assert (member.first_seen, member.last_seen) == (0.0, 0.5)
    assert m.heard_at("d0") == 0.5


@pytest.mark.parametrize("change", [
    {"state": pb.STATE_DRAINING},
    {"endpoint": "elsewhere:1"},
    {"metrics_endpoint": "d0:9090"},
    {"rank": 3},
    {"placement_version": 2},
    {"role": pb.ROLE_PREFILL},
])
def test_identity_changes_are_reported(change):
    m = Membership(1.0)
    m.observe(hb("d0"), 0.0)
    assert m.observe(hb("d0", **change), 0.1) is True
    assert m.get("d0").first_seen == 0.0, "a change is not a new life"


@pytest.mark.parametrize("instance_id", ["", "has space", "a*b", "a>b", "ü"])
def test_bad_instance_id_is_rejected(instance_id):
    m = Membership(1.0)
    with pytest.raises(HeartbeatRejected, match="is not a valid KV key"):
        m.observe(hb(instance_id), 0.0)
    assert len(m) == 0


def test_unknown_role_is_rejected():
    m = Membership(1.0)
    with pytest.raises(HeartbeatRejected, match="d0: unknown role 0"):
        m.observe(hb("d0", role=pb.ROLE_UNSPECIFIED), 0.0)
    with pytest.raises(HeartbeatRejected, match="unknown role 99"):
        m.observe(hb("d0", role=99), 0.0)
    assert "d0" not in m


def test_an_instance_cannot_report_itself_dead():
    m = Membership(1.0)
    m.observe(hb("d0"), 0.0)
    with pytest.raises(HeartbeatRejected, match=f"d0: an instance cannot report state "
                                                f"{pb.STATE_DEAD}"):
        m.observe(hb("d0", state=pb.STATE_DEAD), 0.1)
    assert m.get("d0").state == pb.STATE_SERVING
    assert m.heard_at("d0") == 0.0, "a rejected heartbeat does not count as hearing from it"


def test_get_and_members_return_copies():
    m = Membership(1.0)
    m.observe(hb("d0"), 0.0)
    m.get("d0").state = pb.STATE_DEAD
    m.members()[0].last.endpoint = "mutated"
    assert m.get("d0").state == pb.STATE_SERVING
    assert m.get("d0").last.endpoint == "d0:50051"
    assert m.get("nope") is None and m.heard_at("nope") is None


def test_members_filter_and_counts():
    m = Membership(1.0)
    m.observe(hb("p1", pb.ROLE_PREFILL), 0.0)
    m.observe(hb("d0"), 0.0)
    m.observe(hb("p0", pb.ROLE_PREFILL, pb.STATE_STARTING), 0.0)
    assert [x.last.instance_id for x in m.members()] == ["d0", "p0", "p1"]
    assert [x.last.instance_id for x in m.members(role=pb.ROLE_PREFILL)] == ["p0", "p1"]
    assert [x.last.instance_id for x in m.members(state=pb.STATE_SERVING)] == ["d0", "p1"]
    assert [x.last.instance_id for x in m.members(pb.ROLE_PREFILL, pb.STATE_STARTING)] == ["p0"]
    assert m.counts() == {(pb.ROLE_PREFILL, pb.STATE_SERVING): 1,
                          (pb.ROLE_DECODE, pb.STATE_SERVING): 1,
                          (pb.ROLE_PREFILL, pb.STATE_STARTING): 1}


# -- sweep, revival, forget --------------------------------------------------------------------

def test_sweep_marks_silent_members_dead_once():
    m = Membership(1.5)
    m.observe(hb("a"), 0.0)
    m.observe(hb("b"), 1.0)
    assert m.sweep(1.5) == [], "exactly dead_after_s of silence is still alive"
    assert m.sweep(1.6) == ["a"]
    assert m.get("a").state == pb.STATE_DEAD and m.get("b").state == pb.STATE_SERVING
    assert m.sweep(1.7) == [], "already dead is not reported again"
    assert m.sweep(10.0) == ["b"]
    assert m.counts() == {(pb.ROLE_DECODE, pb.STATE_DEAD): 2}


def test_a_dead_member_comes_back_with_a_new_life():
    m = Membership(1.0)
    m.observe(hb("d0"), 0.0)
    m.observe(hb("d0"), 0.5)
    m.sweep(5.0)
    assert m.observe(hb("d0"), 6.0) is True
    member = m.get("d0")
    assert member.state == pb.STATE_SERVING
    assert (member.first_seen, member.last_seen) == (6.0, 6.0)


def test_forget_dead_drops_only_old_dead_members():
    m = Membership(1.0)
    m.observe(hb("old"), 0.0)
    m.observe(hb("recent"), 8.0)
    m.observe(hb("alive"), 0.0)
    m.sweep(9.5)  # old and alive(!) are silent past 1s; recent is too
    m.observe(hb("alive"), 9.6)
    assert m.forget_dead(now=10.0, older_than_s=5.0) == ["old"]
    assert "old" not in m and m.heard_at("old") is None
    assert "recent" in m and "alive" in m
    assert m.forget_dead(now=13.1, older_than_s=5.0) == ["recent"]
    assert m.forget_dead(now=1000.0, older_than_s=5.0) == [], "live members are never dropped"
    assert [x.last.instance_id for x in m.members()] == ["alive"]


# -- restore -----------------------------------------------------------------------------------

def member(instance_id: str, state: int, last_seen: float, role: int = pb.ROLE_DECODE,
           **kw) -> pb.Member:
    return pb.Member(last=hb(instance_id, role, pb.STATE_SERVING, **kw), state=state,
                     first_seen=last_seen - 1, last_seen=last_seen)


def test_restore_gives_live_members_a_fresh_window():
    records = [member("live", pb.STATE_SERVING, 10.0), member("dead", pb.STATE_DEAD, 10.0),
               member("future", pb.STATE_SERVING, 200.0)]
    m = Membership.restored(records, dead_after_s=2.0, now=100.0)
    assert len(m) == 3
    assert m.heard_at("live") == 100.0
    assert m.heard_at("dead") == 10.0
    assert m.heard_at("future") == 200.0
    assert m.get("live").last_seen == 10.0, "the stored record itself is unchanged"
    assert m.sweep(101.0) == []
    assert m.sweep(102.5) == ["live"]


def test_restore_skips_records_with_impossible_ids_and_copies_the_rest():
    good = member("ok", pb.STATE_SERVING, 1.0)
    m = Membership.restored([member("bad id", pb.STATE_SERVING, 1.0), good], 1.0, now=5.0)
    assert [x.last.instance_id for x in m.members()] == ["ok"]
    good.state = pb.STATE_DEAD
    assert m.get("ok").state == pb.STATE_SERVING, "restore does not alias the caller's records"


def test_restored_dead_member_revives_on_heartbeat():
    m = Membership.restored([member("d0", pb.STATE_DEAD, 1.0)], 1.0, now=5.0)
    assert m.observe(hb("d0"), 6.0) is True
    assert m.get("d0").first_seen == 6.0


# -- expert endpoints --------------------------------------------------------------------------

def test_expert_endpoints_by_rank_when_all_ranks_serve():
    m = Membership(1.0)
    m.observe(worker("w1", 1), 0.0)
    m.observe(worker("w0", 0), 0.0)
    m.observe(hb("d0"), 0.0)  # not an expert worker
    assert m.expert_endpoints(2, placement_version=1) == ["w0:6000", "w1:6000"]


def test_expert_endpoints_none_while_a_rank_is_missing():
    m = Membership(1.0)
    m.observe(worker("w0", 0), 0.0)
    assert m.expert_endpoints(2, 1) is None


@pytest.mark.parametrize("bad", [
    {"state": pb.STATE_STARTING},
    {"state": pb.STATE_DRAINING},
    {"version": 2},
    {"endpoint": ""},
])
def test_expert_endpoints_need_serving_workers_on_this_placement(bad):
    m = Membership(1.0)
    m.observe(worker("w0", 0), 0.0)
    m.observe(worker("w1", 1, **bad), 0.0)
    assert m.expert_endpoints(2, 1) is None


def test_expert_endpoints_ignore_dead_workers():
    m = Membership(1.0)
    m.observe(worker("w0", 0), 0.0)
    m.observe(worker("w1", 1), 5.0)
    m.sweep(5.5)
    assert m.get("w0").state == pb.STATE_DEAD
    assert m.expert_endpoints(2, 1) is None


def test_expert_endpoints_ignore_ranks_beyond_the_worker_count():
    m = Membership(1.0)
    m.observe(worker("w0", 0), 0.0)
    m.observe(worker("w5", 5), 0.0)
    assert m.expert_endpoints(1, 1) == ["w0:6000"]


def test_two_instances_claiming_one_rank_most_recent_wins():
    m = Membership(10.0)
    m.observe(worker("old-pod", 0, endpoint="old:6000"), 1.0)
    m.observe(worker("new-pod", 0, endpoint="new:6000"), 2.0)
    assert m.expert_endpoints(1, 1) == ["new:6000"]
    m.observe(worker("old-pod", 0, endpoint="old:6000"), 3.0)  # the old copy still beats
    assert m.expert_endpoints(1, 1) == ["old:6000"]


def test_rank_claim_tie_breaks_deterministically_by_instance_id():
    m = Membership(10.0)
    m.observe(worker("b", 0, endpoint="b:1"), 1.0)
    m.observe(worker("a", 0, endpoint="a:1"), 1.0)
    assert m.expert_endpoints(1, 1) == ["b:1"]


def test_stale_placement_version_does_not_count_until_it_reloads():
    m = Membership(1.0)
    m.observe(worker("w0", 0, version=1), 0.0)
    m.observe(worker("w1", 1, version=1), 0.0)
    assert m.expert_endpoints(2, 2) is None
    assert m.observe(worker("w0", 0, version=2), 0.1) is True
    assert m.expert_endpoints(2, 2) is None
    m.observe(worker("w1", 1, version=2), 0.1)
    assert m.expert_endpoints(2, 2) == ["w0:6000", "w1:6000"]
    assert m.expert_endpoints(2, 1) is None
