"""An expert worker lost for good, with no restart and experts that only it held: the
scheduler places those experts on the live workers' spare slots and rolls the placement out;
requests wait for it and then succeed, equal to the reference engine."""

from __future__ import annotations

import asyncio
import time

from services.local.cluster import ClusterSpec
from services.model.config import ModelConfig
from tests.integration.cluster_helpers import (
    check_invariant,
    read_topology,
    reference,
    run_remote,
    start,
)
from tests.integration.cluster_helpers import workload as make_workload


def test_experts_of_a_lost_worker_are_placed_on_the_others(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    reqs = make_workload(cfg.vocab_size, seed=41)
    expected = reference(tiny_model_dir, reqs)
    # 3 workers x 8 slots for 16 experts: 8 spare copies, but worker 1's experts 6..10 (say)
    # have no other copy until the scheduler moves them.
    spec = ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=3,
                       redundant_experts=8, extra={"scheduler": ("--lost-worker-grace-s", "2")})
    cluster = start(spec)
    try:
        before = asyncio.run(read_topology(cluster.nats_url, **cluster.nats_options()))
        cluster.process("expert-worker-1").kill()
        t0 = time.monotonic()
        got = asyncio.run(run_remote(cluster.router_endpoint, reqs, "-lost"))
        check_invariant(reqs, expected, got)
        after = asyncio.run(read_topology(cluster.nats_url, **cluster.nats_options()))
        assert after.version == before.version + 1 and list(after.lost_ranks) == [1]
        print(f"served around the lost worker after {time.monotonic() - t0:.1f}s")
    finally:
        cluster.stop()
