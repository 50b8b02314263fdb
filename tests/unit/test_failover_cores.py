"""The pure cores of failover: reply deadlines, routing around down workers, the router's
view during a control-plane outage and of suspected instances."""

from __future__ import annotations

import numpy as np
import pytest

from services.balance.naive import contiguous_placement
from services.balance.placement import NoLiveReplica
from services.common.deadline import ObservedDeadline
from services.common.load import InstanceLoad
from services.router.instances import DECODE, InstanceReport, InstanceView


def test_deadline_is_the_ceiling_until_warm_then_follows_what_was_seen():
    d = ObservedDeadline(floor_s=0.5, ceiling_s=30.0, factor=8.0, warmup=3)
    assert d.deadline(10) == 30.0
    for _ in range(3):
        d.observe(10, 0.01)
    assert d.deadline(10) == 0.5  # 8 x 0.01 is under the floor
    d.observe(10, 0.2)
    assert d.deadline(10) == pytest.approx(1.6)  # 8 x the slowest
    assert d.deadline(100) == pytest.approx(16.0)  # scaled up by tokens
    assert d.deadline(1) == pytest.approx(1.6)  # never scaled down
    assert d.deadline(10_000) == 30.0


def test_deadline_quantile_ignores_a_rare_outlier():
    d = ObservedDeadline(floor_s=0.01, ceiling_s=100.0, factor=1.0, window=100, warmup=0,
                         quantile=0.9)
    for _ in range(99):
        d.observe(1, 0.1)
    d.observe(1, 50.0)
    assert d.deadline() == pytest.approx(0.1)


def test_route_skips_down_workers_and_says_when_no_replica_is_left():
    table = contiguous_placement(8, 4, (1,), redundant=8)  # every expert on two workers
    ids = np.array([[0, 1], [2, 7], [0, 0]])
    slots = table.route(1, ids, down=frozenset({0}))
    assert not np.isin(slots // table.slots_per_worker, [0]).any()
    assert (table.phy2log_array()[0][slots] == ids).all()  # same experts, other replicas
    lean = contiguous_placement(8, 4, (1,))
    with pytest.raises(NoLiveReplica) as err:
        lean.route(1, ids, down=frozenset({0}))
    assert err.value.experts == [0, 1]


def _view(*ids: str, now: float = 100.0) -> InstanceView:
    view = InstanceView(dead_after_s=1.5, suspect_s=10.0)
    for i in ids:
        view.heard(now)
        view.observe(InstanceReport(i, DECODE, f"{i}:1", "serving", InstanceLoad()), now)
    return view


def _eligible(view: InstanceView, now: float) -> list[str]:
    return [i.instance_id for i in view.eligible(DECODE, now)]


def test_a_control_plane_outage_freezes_the_view():
    view = _view("d0", "d1")
    view.heard(102.5)  # the control plane still works: d0 and d1 are silent
    assert _eligible(view, 103.0) == []
    frozen = _view("d0", "d1")  # nothing heard at all since 100: NATS is down
    assert frozen.outage(120.0) and _eligible(frozen, 120.0) == ["d0", "d1"]


def test_a_suspect_waits_for_its_next_heartbeat_or_the_suspect_window():
    view = _view("d0", "d1")
    view.suspect("d0", 100.2)
    assert _eligible(view, 100.3) == ["d1"]
    view.heard(100.5)
    view.observe(InstanceReport("d0", DECODE, "d0:1", "serving", InstanceLoad()), 100.5)
    assert _eligible(view, 100.6) == ["d0", "d1"]  # it beat again
    view.suspect("d1", 100.7)
    assert _eligible(view, 100.8) == ["d0"]
    assert "failed a call" in view.describe(DECODE, 100.8)
    frozen = _view("d0")
    frozen.suspect("d0", 100.1)
    assert _eligible(frozen, 105.0) == []
    assert _eligible(frozen, 111.0) == ["d0"]  # no heartbeat can come in an outage
