"""Core pinning of a local cluster's torch processes (services/local/core_pinning.py)."""

from __future__ import annotations

import os

import pytest

from services.common.cpu_cores import CPU_CORES_ENV, apply_from_env, parse_cores
from services.local.cluster import ClusterSpec
from services.local.core_pinning import plan_cores


def test_attention_instances_first_then_workers_round_robin():
    names = ClusterSpec(model="m", prefill=1, decode=1, expert_workers=4).process_names()
    plan = plan_cores(names, [0, 1])
    assert plan == {"prefill-0": 0, "decode-0": 1, "expert-worker-0": 0, "expert-worker-1": 1,
                    "expert-worker-2": 0, "expert-worker-3": 1}
    # the control plane floats
    assert not {"scheduler", "ledger", "router-0"} & set(plan)


def test_more_cores_than_processes_gives_each_its_own():
    plan = plan_cores(["router-0", "decode-0", "prefill-0", "expert-worker-0"], [7, 3, 5, 9, 11])
    assert sorted(plan.values()) == [3, 5, 7]
    assert len(set(plan.values())) == len(plan)


def test_no_cores_is_an_error():
    with pytest.raises(ValueError, match="no CPU cores"):
        plan_cores(["decode-0"], [])


def test_core_lists_parse():
    assert parse_cores("0,2-3, 5") == [0, 2, 3, 5]
    assert parse_cores("") == []
    for bad in ("a", "1-b", "-1", "0;1"):
        with pytest.raises(ValueError, match="not a core list"):
            parse_cores(bad)


def test_apply_from_env_sets_the_mask():
    mine = sorted(os.sched_getaffinity(0))
    try:
        assert apply_from_env({}) is None
        assert apply_from_env({CPU_CORES_ENV: str(mine[0])}) == [mine[0]]
        assert os.sched_getaffinity(0) == {mine[0]}
    finally:
        os.sched_setaffinity(0, mine)
