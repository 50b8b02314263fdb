"""Shared pieces of the cluster tests: start a LocalCluster, build a workload, run the
reference engine on the same requests."""

from __future__ import annotations

import asyncio
import time

import nats
import openai
import pytest
import torch

from services.client import InferenceClient, RemoteCompletion
from services.common import subjects
from services.common.control import kv_get
from services.common.metrics_http import scrape_metrics
from services.engine.compare import assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.local.cluster import ClusterSpec, LocalCluster
from services.model.loader import load_model
from services.protos_gen.epserve.v1 import control_pb2


def start(spec: ClusterSpec) -> LocalCluster:
    cluster = LocalCluster(spec)
    try:
        return cluster.start(timeout=240)
    except BaseException:
        print(cluster.log_tails(40))
        raise


def openai_client(cluster: LocalCluster, api_key: str = "unused") -> openai.OpenAI:
    """The real `openai` client on router-0's HTTP API: no retries, a minute per call."""
    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=api_key, max_retries=0,
                         timeout=60)


def http_cluster_fixtures(max_inflight: int = 16):
    """A module's `cluster` (tiny model, one prefill, decode and router, two expert workers,
    the HTTP API on a free port) and `client` (the real openai client on it) fixtures:
    `cluster, client = http_cluster_fixtures()` at module level."""

    @pytest.fixture(scope="module")
    def cluster(tiny_model_dir):
        c = start(ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2,
                              http_port=0, max_inflight=max_inflight))
        yield c
        c.stop()

    @pytest.fixture(scope="module")
    def client(cluster) -> openai.OpenAI:
        with openai_client(cluster) as c:
            yield c

    return cluster, client


def workload(vocab: int, seed: int = 7) -> list[GenerationRequest]:
    """Concurrent requests of different lengths and sampling params (greedy and seeded)."""
    g = torch.Generator().manual_seed(seed)
    lens = (3, 17, 9, 30, 1, 12)
    params = (
        SamplingParams(max_tokens=12, ignore_eos=True),
        SamplingParams(max_tokens=20, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=16, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=1.2, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=14, ignore_eos=True),
    )
    return [GenerationRequest(f"w{seed}-{i}", torch.randint(5, vocab, (n,), generator=g).tolist(),
                              p) for i, (n, p) in enumerate(zip(lens, params, strict=True))]


def reference(model_dir, reqs: list[GenerationRequest]):
    return ReferenceEngine(load_model(model_dir), record_logits=True).generate(reqs)


async def run_remote(endpoint: str, reqs: list[GenerationRequest], suffix: str = ""
                     ) -> list[RemoteCompletion]:
    async with InferenceClient(endpoint) as client:
        return list(await asyncio.gather(*(
            client.generate(r.request_id + suffix, prompt_ids=r.prompt_ids, params=r.params)
            for r in reqs)))


def check_invariant(reqs, expected, got) -> None:
    """The master invariant: greedy outputs equal the reference's (near-tie rule), seeded
    ones exactly; same finish reasons and lengths."""
    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    assert_same_greedy([expected[i].token_ids for i in greedy], [got[i].token_ids for i in greedy],
                       expected_logits=[expected[i].logits for i in greedy])
    for i, r in enumerate(reqs):
        if not r.params.greedy:  # same seed, same logits up to rounding -> same draws
            assert got[i].token_ids == expected[i].token_ids, r.request_id
        assert got[i].finish_reason == expected[i].finish_reason
        assert len(got[i].token_ids) == r.params.max_tokens


def decode_metrics(cluster, name: str = "decode-0") -> dict[str, float]:
    return scrape_metrics(cluster.metrics_urls[name])


def wait_for(predicate, timeout: float = 15.0, what: str = "") -> None:
    """Poll `predicate` every 0.1 s until it is true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


async def read_topology(nats_url: str, **connect_kw) -> control_pb2.Topology:
    """The scheduler's topology as it is in JetStream KV now (`connect_kw`: the cluster's
    `nats_options()`, its TLS identity)."""
    nc = await nats.connect(nats_url, **connect_kw)
    try:
        kv = await nc.jetstream().key_value(subjects.TOPOLOGY_BUCKET)
        return await kv_get(kv, subjects.TOPOLOGY_KEY, control_pb2.Topology)
    finally:
        await nc.close()
