"""The master invariant on a wider cluster: v3-mini (256 routed experts, 8 active, 8 groups),
2 prefill, 2 decode and 4 expert workers with 8 redundant slots; several rounds of concurrent
requests, so both instances of each role serve and continuous batching mixes requests."""

from __future__ import annotations

import asyncio

import pytest

from services.common.metrics_http import scrape_metrics
from services.local.cluster import ClusterSpec
from services.model.config import ModelConfig
from tests.integration.cluster_helpers import (
    check_invariant,
    reference,
    run_remote,
    start,
    workload,
)


@pytest.fixture(scope="module")
def wide_cluster(mini_model_dir):
    c = start(ClusterSpec(model=str(mini_model_dir), prefill=2, decode=2, expert_workers=4,
                          redundant_experts=8))
    yield c
    c.stop()


def test_master_invariant_two_prefill_two_decode_four_workers(wide_cluster, mini_model_dir):
    vocab = ModelConfig.from_dir(mini_model_dir).vocab_size
    rounds = [workload(vocab, seed=s) for s in (1, 2)]
    expected = [reference(mini_model_dir, reqs) for reqs in rounds]

    async def go():  # both rounds at once: 12 concurrent requests
        return await asyncio.gather(*(run_remote(wide_cluster.router_endpoint, reqs)
                                      for reqs in rounds))

    got = asyncio.run(go())
    for reqs, exp, out in zip(rounds, expected, got, strict=True):
        check_invariant(reqs, exp, out)
    for role in ("prefill", "decode"):
        for i in range(2):
            m = scrape_metrics(wide_cluster.metrics_urls[f"{role}-{i}"])
            ok = m.get(f'epserve_{role}_requests_total{{outcome="{"ok" if role == "prefill" else "finished"}"}}', 0)
            assert ok > 0, f"{role}-{i} served nothing: the router did not spread the load"
