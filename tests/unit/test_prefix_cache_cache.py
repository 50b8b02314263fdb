"""PrefixCache: the longest cached prefix of a prompt, from memory or disk, bit-exact."""

from __future__ import annotations

import threading

import pytest
import torch
from prometheus_client import REGISTRY

from services.prefix_cache.cache import CacheHit, PrefixCache
from services.prefix_cache.disk_store import DiskPageStore
from services.prefix_cache.keys import kv_layout, namespace_key, page_keys
from services.prefix_cache.memory_tier import MemoryTier
from services.prefix_cache.planner import ReadPlanner

LAYERS, LATENT = 2, 80


def ns(dtype: torch.dtype) -> bytes:
    return namespace_key("test-model", kv_layout(LAYERS, LATENT, dtype))


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7_777 + i * 31) % 100_000 for i in range(n)]


def latent(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, n, LATENT, generator=g).to(dtype)


def make(tmp_path, dtype=torch.float32, memory=True, disk=True, planner=None,
         disk_budget=1 << 30) -> PrefixCache:
    store = DiskPageStore(tmp_path / "pages", disk_budget, ns(dtype)) if disk else None
    tier = MemoryTier(64 << 20) if memory else None
    return PrefixCache(ns(dtype), (LAYERS, LATENT, dtype), store, tier, planner)


def test_empty_cache_misses(tmp_path):
    hit = make(tmp_path).lookup(prompt(300))
    assert hit == CacheHit(tokens=0, latent=None, from_memory=0, from_disk=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory, disk", [(True, True), (True, False), (False, True)])
def test_hits_whole_pages_exactly(tmp_path, dtype, memory, disk):
    cache = make(tmp_path, dtype, memory=memory, disk=disk)
    ids, x = prompt(200), latent(200, dtype)
    stored = cache.store(ids, x)
    assert stored == (3 if disk else 0)
    for n, expected in [(63, 0), (64, 64), (127, 64), (128, 128), (200, 192)]:
        hit = cache.lookup(ids[:n])
        assert hit.tokens == expected
        assert hit.from_memory + hit.from_disk == expected // 64
        if expected == 0:
            assert hit.latent is None
        else:
            assert hit.latent.dtype == dtype
            assert hit.latent.shape == (LAYERS, expected, LATENT)
            assert torch.equal(hit.latent, x[:, :expected])


def test_shared_prefix_hits_the_shared_full_pages_only(tmp_path):
    cache = make(tmp_path)
    ids, x = prompt(256), latent(256, torch.float32)
    cache.store(ids, x)
    other = ids[:150] + prompt(106, seed=9)  # diverges inside page 2
    hit = cache.lookup(other)
    assert hit.tokens == 128 and torch.equal(hit.latent, x[:, :128])
    diverge_page_0 = [ids[0] + 1] + ids[1:]
    assert cache.lookup(diverge_page_0).tokens == 0


def test_memory_then_disk_counts(tmp_path):
    cache = make(tmp_path)
    ids, x = prompt(256), latent(256, torch.float32)
    assert cache.store(ids, x) == 4
    assert cache.store(ids, x) == 0  # all resident
    hit = cache.lookup(ids)
    assert (hit.from_memory, hit.from_disk) == (4, 0)
    # Another instance (or a restart) with an empty memory tier, same disk.
    fresh = PrefixCache(cache.namespace, (LAYERS, LATENT, torch.float32),
                        DiskPageStore(tmp_path / "pages", 1 << 30, cache.namespace),
                        MemoryTier(64 << 20))
    hit = fresh.lookup(ids)
    assert (hit.from_memory, hit.from_disk, hit.tokens) == (0, 4, 256)
    assert torch.equal(hit.latent, x)
    hit = fresh.lookup(ids)  # the disk pages went into memory
    assert (hit.from_memory, hit.from_disk) == (4, 0)
    assert sorted(fresh.memory_keys()) == sorted(page_keys(cache.namespace, ids))


def test_mixed_memory_and_disk(tmp_path):
    cache = make(tmp_path)
    ids, x = prompt(256), latent(256, torch.float32)
    cache.store(ids, x)
    keys = page_keys(cache.namespace, ids)
    # Keep only pages 0 and 2 in memory: the walk takes 0 from memory, 1 from disk, 2 from
    # memory again, 3 from disk.
    tier = MemoryTier(64 << 20)
    for i in (0, 2):
        tier.put(keys[i], cache.memory.get(keys[i]))
    mixed = PrefixCache(cache.namespace, (LAYERS, LATENT, torch.float32), cache.disk, tier)
    hit = mixed.lookup(ids)
    assert (hit.from_memory, hit.from_disk) == (2, 2) and torch.equal(hit.latent, x)


def test_stops_at_a_corrupt_page(tmp_path):
    cache = make(tmp_path, memory=False)
    ids, x = prompt(256), latent(256, torch.float32)
    cache.store(ids, x)
    path = cache.disk.path(page_keys(cache.namespace, ids)[2])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    hit = cache.lookup(ids)
    assert hit.tokens == 128 and torch.equal(hit.latent, x[:, :128])
    assert cache.store(ids, x) == 1  # the damaged page is rewritten; its children were kept
    assert cache.lookup(ids).tokens == 256


def test_planner_skips_a_slow_disk(tmp_path):
    planner = ReadPlanner()
    cache = make(tmp_path, memory=False, planner=planner)
    ids, x = prompt(256), latent(256, torch.float32)
    cache.store(ids, x)
    skipped = REGISTRY.get_sample_value("epserve_prefix_cache_disk_reads_skipped_total") or 0
    planner.observe_read(1_000, 1.0)  # 1 KB/s: a page (41 KB) takes 41 s to read
    planner.observe_prefill(10_000, 1.0)  # 64 tokens take 6.4 ms to recompute
    hit = cache.lookup(ids)
    assert (hit.tokens, hit.from_disk) == (0, 0)
    assert REGISTRY.get_sample_value("epserve_prefix_cache_disk_reads_skipped_total") == skipped + 1


def test_planner_reads_a_fast_disk_and_learns_from_it(tmp_path):
    planner = ReadPlanner()
    cache = make(tmp_path, memory=False, planner=planner)
    ids, x = prompt(256), latent(256, torch.float32)
    cache.store(ids, x)
    cache.observe_prefill(10, 1.0)  # 10 tokens/s: recomputing is slow
    assert planner.read_bytes_per_s is None
    hit = cache.lookup(ids)
    assert hit.from_disk == 4 and torch.equal(hit.latent, x)
    assert planner.read_bytes_per_s is not None  # measured by the reads themselves


def test_store_rejects_mismatches(tmp_path):
    cache = make(tmp_path)
    with pytest.raises(ValueError):
        cache.store(prompt(64), latent(65, torch.float32))
    with pytest.raises(ValueError):
        cache.store(prompt(64), latent(64, torch.bfloat16))
    with pytest.raises(ValueError):
        cache.store(prompt(64), torch.zeros(LAYERS + 1, 64, LATENT))
    assert cache.store(prompt(63), latent(63, torch.float32)) == 0


def test_stored_pages_do_not_alias_the_callers_tensor(tmp_path):
    cache = make(tmp_path, disk=False)
    ids, x = prompt(128), latent(128, torch.float32)
    cache.store(ids, x)
    expected = x.clone()
    x.zero_()
    assert torch.equal(cache.lookup(ids).latent, expected)
    assert cache.memory.total_bytes == 2 * LAYERS * 64 * LATENT * 4  # compact copies


def test_disk_budget_keeps_the_head_of_a_long_prompt(tmp_path):
    page_file = make(tmp_path, disk=False).page_file_bytes
    cache = make(tmp_path, memory=False, disk_budget=3 * page_file)
    ids, x = prompt(64 * 6), latent(64 * 6, torch.float32)
    assert cache.store(ids, x) == 4  # the 4th is written, then evicted; the 5th is an orphan
    hit = cache.lookup(ids)
    assert hit.tokens == 192 and torch.equal(hit.latent, x[:, :192])


def test_concurrent_lookup_and_store(tmp_path):
    cache = make(tmp_path)
    prompts = [(prompt(192, seed=s), latent(192, torch.float32, seed=s)) for s in range(6)]
    errors: list[BaseException] = []

    def writer():
        try:
            for ids, x in prompts:
                cache.store(ids, x)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    for _ in range(50):
        for ids, x in prompts:
            hit = cache.lookup(ids)
            assert torch.equal(hit.latent, x[:, :hit.tokens]) if hit.tokens else hit.latent is None
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors
    assert all(cache.lookup(ids).tokens == 192 for ids, _ in prompts)


def test_tenants_never_hit_each_others_pages(tmp_path):
    cache = make(tmp_path)
    ids, x = prompt(200), latent(200, torch.float32)
    assert cache.store(ids, x, tenant="acme") == 3
    assert cache.lookup(ids, tenant="acme").tokens == 192
    assert cache.lookup(ids, tenant="globex").tokens == 0
    assert cache.lookup(ids).tokens == 0  # no tenant (no API keys) is a tenant of its own
    again = make(tmp_path, memory=False)  # from the disk alone, after a restart
    again.disk.scan()
    assert again.lookup(ids, tenant="acme").tokens == 192
    assert again.lookup(ids, tenant="globex").tokens == 0
