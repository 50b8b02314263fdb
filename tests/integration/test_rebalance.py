"""Live expert rebalancing with real processes: a skewed workload makes the scheduler re-plan
while requests are generating; workers load their new slots in the background, everyone
switches at a step boundary, and the outputs still equal the reference engine's."""

from __future__ import annotations

import asyncio

import nats

from services.common import subjects
from services.common.control import kv_get
from services.engine.reference import GenerationRequest
from services.engine.sampling import SamplingParams
from services.local.cluster import ClusterSpec
from services.protos_gen.epserve.v1 import control_pb2
from tests.integration.cluster_helpers import (
    check_invariant,
    read_topology,
    reference,
    run_remote,
    start,
)

REBALANCE = ClusterSpec(
    model="", prefill=1, decode=1, expert_workers=2, redundant_experts=2,
    extra={"scheduler": ("--rebalance-threshold", "0.97", "--rebalance-check-s", "0.3",
                         "--load-window-s", "30", "--rebalance-min-tokens", "30",
                         "--rebalance-cooldown-s", "30"),
           "expert-worker": ("--load-report-interval-s", "0.2", "--release-after-s", "1")})


def skewed(n: int, max_tokens: int, tag: str) -> list[GenerationRequest]:
    # One repeated prompt: every request routes its tokens to the same few experts.
    prompt = [7, 7, 7, 9, 9, 9, 7, 9] * 3
    return [GenerationRequest(f"{tag}-{i}", prompt[: 10 + i], SamplingParams(
        max_tokens=max_tokens + 20 * i, ignore_eos=True)) for i in range(n)]


async def _member(nats_url: str, instance_id: str, **connect_kw) -> control_pb2.Member:
    nc = await nats.connect(nats_url, **connect_kw)
    try:
        kv = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
        return await kv_get(kv, instance_id, control_pb2.Member)
    finally:
        await nc.close()


def test_skewed_load_triggers_a_rebalance_mid_generation(tiny_model_dir):
    from dataclasses import replace

    cluster = start(replace(REBALANCE, model=str(tiny_model_dir)))
    try:
        first = skewed(4, 120, "skew")
        expected = reference(tiny_model_dir, first)

        async def run_and_watch():
            run = asyncio.create_task(run_remote(cluster.router_endpoint, first))
            versions = []
            while not run.done():
                topo = await read_topology(cluster.nats_url, **cluster.nats_options())
                versions.append((topo.version, bool(all(topo.worker_endpoints))))
                await asyncio.sleep(0.1)
            return await run, versions

        got, versions = asyncio.run(run_and_watch())
        check_invariant(first, expected, got)
        assert max(v for v, _ in versions) >= 2, (
            f"no rebalance while generating; versions seen {sorted(set(versions))}\n"
            + cluster.log_tails(15))

        # After the roll-out: new requests run on the new placement and still match.
        second = skewed(3, 20, "after")
        got2 = asyncio.run(run_remote(cluster.router_endpoint, second))
        check_invariant(second, reference(tiny_model_dir, second), got2)
        topo = asyncio.run(read_topology(cluster.nats_url, **cluster.nats_options()))
        assert topo.version >= 2 and all(topo.worker_endpoints)
        decode = asyncio.run(_member(cluster.nats_url, "decode-0", **cluster.nats_options()))
        assert decode.last.placement_version >= 2  # it switched (a later plan may be rolling)
    except BaseException:
        print(cluster.log_tails(60))
        raise
    finally:
        cluster.stop()
