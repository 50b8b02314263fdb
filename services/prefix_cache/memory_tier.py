"""Pages in host memory: an LRU of key -> latent tensor [layers, PAGE_TOKENS, latent_dim].

No prefix closure here: a memory miss falls through to the disk, which keeps whole chains.
Sizes count the tensor's elements, so callers store compact copies (a view would keep the
whole prompt's tensor alive). Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from services.prefix_cache import metrics

if TYPE_CHECKING:
    import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MemoryTier:
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._pages: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # oldest use first
        self._total = 0
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._pages

    def __len__(self) -> int:
        with self._lock:
            return len(self._pages)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def keys(self) -> list[bytes]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._pages)

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
            return page

    def put(self, key: bytes, page: torch.Tensor) -> None:
        """Insert or replace, then evict least recently used pages to the budget. The page
        being put is never evicted: one larger than the whole budget stays alone."""
        with self._lock:
            old = self._pages.pop(key, None)
            if old is not None:
                self._total -= tensor_bytes(old)
            self._pages[key] = page
            self._total += tensor_bytes(page)
            # Each step removes one page other than `key`, so at most len(pages) - 1 steps.
            while self._total > self.budget_bytes and len(self._pages) > 1:
                _, victim = self._pages.popitem(last=False)
                self._total -= tensor_bytes(victim)
            metrics.RESIDENT_BYTES.labels(tier="memory").set(self._total)
