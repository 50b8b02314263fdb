"""Speculative decoding (MTP) through the cluster: the prefill instance runs the checkpoint's
MTP layer over each prompt and sends its KV and first draft with the prompt's, the decode
instance drafts with it, and the outputs, through the router, with the prefix cache warm and
cold, equal the plain reference engine's (master invariant). tiny_mtp's main weights are
tiny's, so tiny's reference engine is plain decoding of the same model. Decode failover with
a speculative instance is in the chaos suite (its decode-0 runs MTP, decode-1 does not)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from services.engine.reference import GenerationRequest
from services.engine.sampling import SamplingParams
from services.local.cluster import ClusterSpec
from services.model.config import ModelConfig
from tests.integration.cluster_helpers import (
    check_invariant,
    decode_metrics,
    reference,
    run_remote,
    start,
    wait_for,
    workload,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tiny_mtp_model_dir, tmp_path_factory):
    c = start(ClusterSpec(model=str(tiny_mtp_model_dir), prefill=1, decode=1, expert_workers=2,
                          speculative="mtp", kv_blocks=64,
                          kv_cache_dir=str(tmp_path_factory.mktemp("spec_kv_cache"))))
    yield c
    c.stop()


def test_speculative_cluster_equals_plain_reference_cold_and_warm(cluster, tiny_model_dir):
    cache_dir = Path(cluster.spec.kv_cache_dir)
    vocab = ModelConfig.from_dir(tiny_model_dir).vocab_size
    g = torch.Generator().manual_seed(5)
    long = [GenerationRequest(f"long-{n}", torch.randint(5, vocab, (n,), generator=g).tolist(),
                              SamplingParams(max_tokens=18, ignore_eos=True, **kw))
            for n, kw in ((70, {}), (140, {"temperature": 0.9, "seed": 3}))]
    reqs = workload(vocab, seed=21) + long  # the long ones fill cache pages (64 tokens)
    expected = reference(tiny_model_dir, reqs)
    cold = asyncio.run(run_remote(cluster.router_endpoint, reqs))
    check_invariant(reqs, expected, cold)
    wait_for(lambda: len([p for p in cache_dir.rglob("*") if p.is_file()]) >= 3, timeout=30,
             what="the long prompts' pages in the cache directory")
    warm = asyncio.run(run_remote(cluster.router_endpoint, reqs, suffix="-again"))
    check_invariant(reqs, expected, warm)
    assert sum(c.server_usage.prompt_cache_hit_tokens for c in warm) > 0
    m = decode_metrics(cluster)
    drafted = sum(v for k, v in m.items() if k.startswith("epserve_decode_spec_draft_tokens_total"))
    assert drafted > 0, "the decode instance verified MTP drafts"
    assert m["epserve_decode_spec_draft_kv_total"] == 2 * len(reqs), \
        "every transfer carried the prompt's MTP KV and first draft"
