"""Overlap and shaped links as `epserve up` sets them up: the flags, and (opt-in) a whole
cluster with overlap on behind link proxies, with traces."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from services.common import subjects
from services.common.control import connect, kv_bucket
from services.engine.compare import assert_same_greedy
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import control_pb2

COMM_OPS = ("DISPATCH", "MLP", "COMBINE")


def test_cluster_spec_overlap_and_link_flags(tiny_model_dir):
    """What `epserve up --micro-batches/--split-policy/--min-batch-tokens/--link-latency-ms`
    turn into (no processes started)."""
    from services.cli.up import add_cluster_args, spec_from
    from services.local.cluster import ClusterSpec, free_port_on_both, proxy_host

    assert ClusterSpec(model="m").scheduler_plan_args() == []
    spec = ClusterSpec(model="m", micro_batches=2, split_policy="even_tokens", min_batch_tokens=0,
                       link_latency_ms=2.0)
    assert spec.scheduler_plan_args() == ["--micro-batches", "2", "--split-policy", "even_tokens",
                                          "--min-batch-tokens", "0"]
    assert spec.shaped_links and not ClusterSpec(model="m").shaped_links
    assert ClusterSpec(model="m", fixed_split=True).scheduler_plan_args() == ["--fixed-split"]
    assert proxy_host("127.0.0.1") == "127.0.0.2" and proxy_host("localhost") == "127.0.0.2"
    with pytest.raises(ValueError, match="loopback"):
        ClusterSpec(model="m", host="10.0.0.5", link_latency_ms=1.0)
    with pytest.raises(ValueError):
        ClusterSpec(model="m", micro_batches=3)
    port = free_port_on_both("127.0.0.1", "127.0.0.2")
    assert 0 < port < 65536
    import argparse

    p = argparse.ArgumentParser()
    add_cluster_args(p)
    args = p.parse_args(["--model", str(tiny_model_dir), "--micro-batches", "2",
                         "--link-latency-ms", "1.5", "--link-bandwidth-mbps", "100",
                         "--trace-dir", "traces", "--fixed-split"])
    spec = spec_from(args)
    assert spec.fixed_split
    assert (spec.micro_batches, spec.link_latency_ms, spec.link_bandwidth_mbps) == (2, 1.5, 100.0)
    assert spec.trace_dir.endswith("traces") and spec.split_policy is None


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EPSERVE_SLOW") != "1",
                    reason="starts a whole cluster (~45 s on 2 cores); EPSERVE_SLOW=1 runs it")
def test_epserve_up_with_link_proxies_plan_and_traces(tiny_model_dir, tmp_path):
    """The whole cluster with overlap on, every expert worker behind a 1 ms link proxy and
    traces on: the master invariant through the router, the proxies are the published worker
    endpoints, and every attention instance wrote a trace with both micro-batches."""
    from services.common.control import kv_get
    from services.local.cluster import ClusterSpec
    from services.local.link_proxy import send_control
    from tests.integration.cluster_helpers import reference, run_remote, start, workload

    spec = ClusterSpec(model=str(tiny_model_dir), expert_workers=2, micro_batches=2,
                       min_batch_tokens=0, fixed_split=True, trace_dir=str(tmp_path / "traces"),
                       link_latency_ms=1.0)
    reqs = [r for r in workload(ModelConfig.from_dir(tiny_model_dir).vocab_size, seed=9)
            if r.params.greedy]
    want = reference(tiny_model_dir, reqs)
    cluster = start(spec)
    try:
        got = asyncio.run(run_remote(cluster.router_endpoint, reqs))

        async def topology():
            nc = await connect(cluster.nats_url, "test-topology", **cluster.nats_options())
            try:
                kv = await kv_bucket(nc.jetstream(), subjects.TOPOLOGY_BUCKET)
                return await kv_get(kv, subjects.TOPOLOGY_KEY, control_pb2.Topology)
            finally:
                await nc.drain()

        topo = asyncio.run(topology())
        stats = json.loads(send_control(*cluster.link_controls[0], "stats"))
    finally:
        cluster.stop()
    assert_same_greedy([c.token_ids for c in want], [c.token_ids for c in got],
                       expected_logits=[c.logits for c in want])
    assert list(topo.worker_endpoints) == [cluster.endpoints[f"link-proxy-{r}"] for r in range(2)]
    assert all(e.startswith("127.0.0.2:") for e in topo.worker_endpoints)
    assert stats["latency_ms"] == 1.0 and stats["bytes"]["upstream"] > 0
    for name in ("prefill-0", "decode-0"):
        events = json.loads((tmp_path / "traces" / f"{name}.json").read_text())["traceEvents"]
        comm = {e["tid"] for e in events if e["name"] == "thread_name"
                and e["args"]["name"].startswith("communication")}
        for op in COMM_OPS:
            spans = [e for e in events if e["ph"] == "X" and e["tid"] in comm and e["name"] == op]
            assert {e["args"]["mb"] for e in spans} == {0, 1}, (name, op)
