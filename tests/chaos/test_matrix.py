"""The chaos suite's pure parts besides the checker: faults, the matrix, the workload plan,
replica partners, and the injector against a stand-in cluster (no real cluster)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from services.balance.placement import PlacementTable
from services.local.link_proxy import ControlServer, LinkProxy
from tests.chaos.faults import KINDS, Fault, Injector
from tests.chaos.harness import is_stopped, replica_partner
from tests.chaos.scenarios import MATRIX, MOMENTS, QUICK, by_key, coverage
from tests.chaos.workload import plan

ROLES = ("router", "scheduler", "prefill", "decode", "expert-worker", "nats")


def test_link_faults_only_for_expert_workers():
    with pytest.raises(ValueError, match="link faults are for expert workers"):
        Fault("blackhole", "decode-0")
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("unplug", "decode-0")
    assert Fault("latency", "expert-worker-3", latency_ms=300).describe() == \
        "latency expert-worker-3 +300ms 3s"


def test_the_matrix_covers_every_kind_role_and_moment():
    cov = coverage()
    assert {k for k, _, _ in cov} == set(KINDS)
    assert {r for _, r, _ in cov} == set(ROLES)
    assert {m for _, _, m in cov} == set(MOMENTS)
    assert len(by_key()) == len(MATRIX)
    assert [s.key for s in QUICK] == ["decode-sigkill-mid", "expert-worker-sigkill-mid",
                                      "expert-worker-sigstop-mid"]
    # every single-fault scenario has a live peer: 0 failed is asserted there
    assert all(s.peer_alive for s in MATRIX if len(s.steps) == 1)
    assert [len(s.steps) for s in MATRIX if not s.peer_alive] == [2, 2]


def test_plan_has_distinct_prompts_mixed_sampling_and_a_burst():
    reqs = plan(3, 100, 8, vocab=512, burst_prompt_tokens=320)
    assert len({tuple(r.prompt_ids) for r in reqs}) == 100
    assert len({r.request_id for r in reqs}) == 100
    assert sum(r.params.greedy for r in reqs) == 50
    assert all(r.params.seed is not None for r in reqs if not r.params.greedy)
    assert sum(r.api == "openai" for r in reqs) == 25
    assert [len(r.prompt_ids) for r in reqs if r.burst] == [320] * 8
    assert plan(3, 100, 8, 512) != plan(4, 100, 8, 512)


def test_replica_partner_is_the_worker_with_most_shared_experts():
    # 4 workers x 2 slots, 4 experts: worker 0 holds (0, 1), worker 2 holds (1, 0)
    table = PlacementTable(1, 4, 4, (1,), ((0, 1, 2, 3, 1, 0, 3, 2),))
    assert replica_partner(table, 0) == 2
    assert replica_partner(table, 1) == 3


class _Proc:
    def __init__(self, popen):
        self.popen = popen

    @property
    def pid(self):
        return self.popen.pid

    def is_running(self):
        return self.popen.poll() is None

    def send_signal(self, sig):
        if self.is_running():
            self.popen.send_signal(sig)


class _Cluster:
    def __init__(self, procs, controls):
        self.procs, self.link_controls, self.nats = procs, controls, None

    def process(self, name):
        return self.procs[name]


def test_injector_stops_and_continues_by_pid_and_drives_the_link_proxy():
    async def go():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        proxy = await LinkProxy("127.0.0.1", 0, "127.0.0.1", 9).start()
        control = await ControlServer(proxy).start()
        cluster = _Cluster({"expert-worker-0": _Proc(child), "link-proxy-0": _Proc(child)},
                           {0: ("127.0.0.1", control.port)})
        inj = Injector(cluster)
        try:
            fired = await inj.fire(Fault("sigstop", "expert-worker-0", hold_s=0.3))
            await asyncio.sleep(0.1)
            assert fired.pid == child.pid and is_stopped(child.pid)
            await inj.wait_repaired(5)
            assert not is_stopped(child.pid) and fired.repaired_t is not None
            await inj.fire(Fault("blackhole", "expert-worker-0", hold_s=0.2))
            assert proxy.stalled
            await inj.fire(Fault("latency", "expert-worker-0", hold_s=0.2, latency_ms=40))
            assert proxy.latency_ms == 40
            await inj.wait_repaired(5)
            assert not proxy.stalled and proxy.latency_ms == 0
            await inj.fire(Fault("sigkill", "expert-worker-0"))
            assert child.wait(5) == -signal.SIGKILL
        finally:
            await inj.close()
            child.kill()
            child.wait()
            await control.close()
            await proxy.close()

    asyncio.run(go())
