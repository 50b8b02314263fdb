"""The prefix KV cache through the real cluster: two prefill instances share one directory;
hits are billed in whole pages from token 0, warm outputs equal the cold run and the reference
engine token for token, corrupt pages are misses, and hits survive a restart of everything.
(With chunked prefill on: long prompts in 64-token chunks.)
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from services.client import InferenceClient
from services.common.metrics_http import scrape_metrics
from services.engine.reference import GenerationRequest
from services.engine.sampling import SamplingParams
from services.local.cluster import ClusterSpec
from services.model.config import ModelConfig
from tests.integration.cluster_helpers import check_invariant, reference, start, wait_for

PAGE = 64
# Every prompt of this module has its own seed: two prompts from one seed share a prefix, and a
# cached prefix where a test expects none fails it (hash() of a string is not stable: no).
CORRUPT_SEEDS = {"flip": 301, "truncate": 302, "swap": 303}


def page_files(root) -> list:
    return sorted(p for p in root.rglob("*.page") if "quarantine" not in p.parts)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv-cache")


def spec(model_dir, cache_dir) -> ClusterSpec:
    """No memory tier: every hit is read from the shared directory (so a corrupt file is
    read, and a page one instance wrote is what the other one hits). Chunked prefill at 64
    tokens: every prompt here longer than that is prefilled in chunks, after its cached
    prefix, and still equals the reference engine's unchunked prefill."""
    return ClusterSpec(model=str(model_dir), prefill=2, decode=1, expert_workers=2,
                       kv_blocks=64, kv_cache_dir=str(cache_dir), kv_cache_memory_bytes=0,
                       http_port=0, extra={"prefill": ("--chunk-tokens", "64")})


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, cache_dir):
    c = start(spec(tiny_model_dir, cache_dir))
    yield c
    c.stop()


def ids(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


async def run(endpoint: str, reqs: list[GenerationRequest], tag: str) -> list:
    async with InferenceClient(endpoint) as client:
        return list(await asyncio.gather(*(
            client.generate(f"{r.request_id}-{tag}", prompt_ids=r.prompt_ids, params=r.params)
            for r in reqs)))


def wait_written(root, pages: int) -> None:
    wait_for(lambda: len(page_files(root)) >= pages, timeout=30,
             what=f"{pages} page files in the cache directory")


def hit_tokens(cluster) -> float:
    return sum(scrape_metrics(cluster.metrics_urls[f"prefill-{i}"]).get(
        'epserve_prefill_prompt_tokens_total{cache="hit"}', 0.0) for i in range(2))


def test_hits_are_whole_pages_from_token_zero(cluster, tiny_model_dir, cache_dir):
    vocab = ModelConfig.from_dir(tiny_model_dir).vocab_size
    lengths, want = (63, 64, 127, 128, 200), (0, 64, 64, 128, 192)
    reqs = [GenerationRequest(f"pages-{n}", ids(vocab, n, seed=n),
                              SamplingParams(max_tokens=4, ignore_eos=True)) for n in lengths]
    before = len(page_files(cache_dir))
    cold = asyncio.run(run(cluster.router_endpoint, reqs, "cold"))
    assert [r.server_usage.prompt_cache_hit_tokens for r in cold] == [0] * 5
    wait_written(cache_dir, before + sum(n // PAGE for n in lengths))
    warm = asyncio.run(run(cluster.router_endpoint, reqs, "warm"))
    for n, hit, c, w in zip(lengths, want, cold, warm, strict=True):
        u = w.server_usage
        assert (u.prompt_cache_hit_tokens, u.prompt_cache_miss_tokens) == (hit, n - hit), n
        assert u.prompt_tokens == n
        assert w.token_ids == c.token_ids, n
    # The same through the OpenAI API, read by the real client: OpenAI's field and DeepSeek's.
    api = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
    r = api.completions.create(model=api.models.list().data[0].id, prompt=reqs[4].prompt_ids,
                               max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 200
    assert r.usage.prompt_tokens_details.cached_tokens == 192
    assert (r.usage.prompt_cache_hit_tokens, r.usage.prompt_cache_miss_tokens) == (192, 8)


def shared_prefix_workload(vocab: int) -> list[GenerationRequest]:
    """A shared 'system prompt' of two pages and a half, then different questions; and a
    multi-turn chat whose every turn extends the last (greedy and seeded sampling)."""
    system = ids(vocab, 150, seed=1)
    turn = system + ids(vocab, 40, seed=2)
    reqs = []
    for k in range(3):
        reqs.append(GenerationRequest(f"shared-{k}", system + ids(vocab, 20 + 7 * k, seed=10 + k),
                                      SamplingParams(max_tokens=10, ignore_eos=True)))
    for k in range(2):
        turn = turn + ids(vocab, 70, seed=20 + k)
        reqs.append(GenerationRequest(f"turn-{k}", list(turn), SamplingParams(
            max_tokens=8, temperature=0.9, top_p=0.95, seed=5 + k, ignore_eos=True)))
    return reqs


def test_warm_outputs_equal_the_cold_run_and_the_reference(cluster, tiny_model_dir, cache_dir):
    reqs = shared_prefix_workload(ModelConfig.from_dir(tiny_model_dir).vocab_size)
    expected = reference(tiny_model_dir, reqs)
    before = len(page_files(cache_dir))
    cold = asyncio.run(run(cluster.router_endpoint, reqs, "cold"))
    check_invariant(reqs, expected, cold)
    # Distinct full pages: 2 of the system prompt, then 2 more of turn 0 and 1 of turn 1.
    wait_written(cache_dir, before + 5)
    hits_before = hit_tokens(cluster)
    warm = asyncio.run(run(cluster.router_endpoint, reqs, "warm"))
    check_invariant(reqs, expected, warm)
    assert [w.token_ids for w in warm] == [c.token_ids for c in cold]
    assert all(w.server_usage.prompt_cache_hit_tokens >= 128 for w in warm)
    assert hit_tokens(cluster) - hits_before == sum(w.server_usage.prompt_cache_hit_tokens
                                                    for w in warm)


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_a_corrupt_page_is_a_miss_and_the_output_is_unchanged(cluster, tiny_model_dir,
                                                             cache_dir, damage):
    vocab = ModelConfig.from_dir(tiny_model_dir).vocab_size
    req = GenerationRequest(f"corrupt-{damage}", ids(vocab, 3 * PAGE + 5, seed=CORRUPT_SEEDS[damage]),
                            SamplingParams(max_tokens=6, ignore_eos=True))
    before = set(page_files(cache_dir))
    (cold,) = asyncio.run(run(cluster.router_endpoint, [req], "cold"))
    wait_written(cache_dir, len(before) + 3)
    mine = sorted(set(page_files(cache_dir)) - before, key=lambda p: p.stat().st_mtime)
    assert len(mine) == 3
    if damage == "flip":
        data = bytearray(mine[0].read_bytes())
        data[len(data) // 2] ^= 0x40
        mine[0].write_bytes(bytes(data))
    elif damage == "truncate":
        mine[0].write_bytes(mine[0].read_bytes()[:-100])
    else:
        a, b = mine[0].read_bytes(), mine[1].read_bytes()
        mine[0].write_bytes(b)
        mine[1].write_bytes(a)
    corrupt_before = corrupt_total(cluster)
    (warm,) = asyncio.run(run(cluster.router_endpoint, [req], "warm"))
    assert warm.token_ids == cold.token_ids
    assert warm.server_usage.prompt_cache_hit_tokens == 0  # page 0 is bad: nothing after it
    assert corrupt_total(cluster) == corrupt_before + 1


def corrupt_total(cluster) -> float:
    total = 0.0
    for i in range(2):
        m = scrape_metrics(cluster.metrics_urls[f"prefill-{i}"])
        total += sum(v for k, v in m.items()
                     if k.startswith("epserve_prefix_cache_corrupt_pages_total"))
    return total


def test_hits_survive_a_restart_and_cross_instances(cluster, tiny_model_dir, cache_dir):
    """Everything stopped and started again on the same directory; then a page one prefill
    instance writes is the other one's hit."""
    cluster.stop()
    vocab = ModelConfig.from_dir(tiny_model_dir).vocab_size
    old = GenerationRequest("pages-200", ids(vocab, 200, seed=200),
                            SamplingParams(max_tokens=4, ignore_eos=True))
    again = start(spec(tiny_model_dir, cache_dir))
    try:
        (w,) = asyncio.run(run(again.router_endpoint, [old], "restarted"))
        assert w.server_usage.prompt_cache_hit_tokens == 192
        fresh = GenerationRequest("cross", ids(vocab, 2 * PAGE + 1, seed=77),
                                  SamplingParams(max_tokens=4, ignore_eos=True))
        one, other = again.process("prefill-0"), again.process("prefill-1")
        other.stop()
        before = len(page_files(cache_dir))
        (first,) = asyncio.run(run(again.router_endpoint, [fresh], "on-0"))
        assert first.server_usage.prompt_cache_hit_tokens == 0
        wait_written(cache_dir, before + 2)
        other.start().wait_healthy(again.endpoints["prefill-1"], 120)
        one.stop()
        (second,) = asyncio.run(run(again.router_endpoint, [fresh], "on-1"))
        assert second.server_usage.prompt_cache_hit_tokens == 2 * PAGE
        assert second.token_ids == first.token_ids
    finally:
        again.stop()
