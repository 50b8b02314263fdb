"""MemoryTier: an LRU of page tensors within a byte budget."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from services.prefix_cache.memory_tier import MemoryTier

PAGE = torch.zeros(2, 64, 8)  # 4096 bytes
PAGE_BYTES = 4096


def k(n: int) -> bytes:
    return bytes([n]) * 32


def test_get_put_and_lru_order():
    tier = MemoryTier(budget_bytes=3 * PAGE_BYTES)
    for n in range(3):
        tier.put(k(n), PAGE.clone() + n)
    assert tier.keys() == [k(0), k(1), k(2)] and tier.total_bytes == 3 * PAGE_BYTES
    assert torch.equal(tier.get(k(0)), PAGE + 0)
    assert tier.keys() == [k(1), k(2), k(0)]
    tier.put(k(3), PAGE.clone())
    assert k(1) not in tier and k(0) in tier and len(tier) == 3
    assert tier.get(k(1)) is None
    assert REGISTRY.get_sample_value("epserve_prefix_cache_resident_bytes",
                                     {"tier": "memory"}) == 3 * PAGE_BYTES


def test_replace_counts_once():
    tier = MemoryTier(budget_bytes=10 * PAGE_BYTES)
    tier.put(k(0), PAGE)
    tier.put(k(0), torch.zeros(2, 64, 8, dtype=torch.bfloat16))
    assert len(tier) == 1 and tier.total_bytes == PAGE_BYTES // 2


def test_never_evicts_the_page_being_put():
    tier = MemoryTier(budget_bytes=PAGE_BYTES // 2)
    tier.put(k(0), PAGE)
    assert tier.keys() == [k(0)]
    tier.put(k(1), PAGE)
    assert tier.keys() == [k(1)] and tier.total_bytes == PAGE_BYTES


def test_rejects_negative_budget():
    with pytest.raises(ValueError):
        MemoryTier(-1)
