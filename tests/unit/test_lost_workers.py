"""Placing around expert workers lost for good: the pure planner and the membership rules."""

from __future__ import annotations

import numpy as np

from services.balance.lost_workers import covers_without, placement_without
from services.balance.naive import contiguous_placement
from services.protos_gen.epserve.v1 import control_pb2 as pb
from services.scheduler.membership import Membership


def test_every_expert_gets_a_live_replica_and_only_spare_copies_move():
    table = contiguous_placement(8, 4, (1, 2), redundant=4)  # 12 slots, 3 per worker
    lost = frozenset({1})
    assert not covers_without(table, lost)
    loads = np.arange(16, dtype=float).reshape(2, 8)
    new = placement_without(table, lost, loads)
    assert new.version == table.version + 1 and covers_without(new, lost)
    for old_row, new_row in zip(table.phy2log, new.phy2log, strict=True):
        changed = [s for s, (a, b) in enumerate(zip(old_row, new_row, strict=True)) if a != b]
        assert all(s // 3 != 1 for s in changed), "the lost worker's slots stay as they were"
        live_old = [e for s, e in enumerate(old_row) if s // 3 != 1]
        for s in changed:  # a replaced slot held a copy that still exists on a live worker
            assert live_old.count(old_row[s]) > 1


def test_without_spare_slots_nothing_can_be_placed_around():
    lean = contiguous_placement(8, 4, (1,))
    assert placement_without(lean, frozenset({2})) is None
    full = contiguous_placement(8, 4, (1,), redundant=8)
    assert covers_without(full, frozenset({2}))


def _worker(rank: int, state: int, version: int = 1, endpoint: str = "") -> pb.Member:
    hb = pb.Heartbeat(instance_id=f"expert-worker-{rank}", role=pb.ROLE_EXPERT_WORKER,
                      endpoint=endpoint or f"w{rank}:1", state=pb.STATE_SERVING, rank=rank,
                      placement_version=version)
    return pb.Member(last=hb, state=state, first_seen=0.0, last_seen=10.0)


def test_lost_ranks_are_dead_for_the_grace_and_not_taken_over():
    members = [_worker(0, pb.STATE_SERVING), _worker(1, pb.STATE_DEAD),
               _worker(2, pb.STATE_SERVING)]
    m = Membership.restored(members, dead_after_s=1.5, now=10.0)
    assert m.lost_ranks(4, 1, now=12.0, grace_s=15.0) == set()  # not for long enough
    assert m.lost_ranks(4, 1, now=30.0, grace_s=15.0) == {1}  # rank 3 never registered
    assert m.expert_endpoints(3, 1) is None
    assert m.expert_endpoints(3, 1, lost=frozenset({1})) == ["w0:1", "w1:1", "w2:1"]
