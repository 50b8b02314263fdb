"""The prefill side of the prefix KV cache (services/prefix_cache): look up the longest cached
prefix of a prompt before its batch runs, store the prompt's new full pages after.

Lookups read disk, so they run on a thread (the event loop keeps serving); writes run on one
background thread behind a bounded queue, so a slow disk delays no response: when the queue is
full the pages are not written (counted), which costs a future hit, never a request.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import structlog
import torch

from services.prefill import metrics
from services.prefix_cache.cache import CacheHit, PrefixCache

log = structlog.get_logger("prefill")
NO_HIT = CacheHit(tokens=0, latent=None, from_memory=0, from_disk=0)


class PrefixReuse:
    def __init__(self, cache: PrefixCache, max_pending_writes: int = 64) -> None:
        self.cache, self.max_pending = cache, max_pending_writes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefix-cache-write")
        self._pending = 0
        self._lock = threading.Lock()

    async def lookup(self, prompt_ids: list[int], tenant: str = "") -> CacheHit:
        try:
            return await asyncio.to_thread(self.cache.lookup, prompt_ids, tenant)
        except Exception as exc:  # the cache is an optimisation: a failure is a miss
            log.warning("prefix_cache_lookup_failed", error=f"{type(exc).__name__}: {exc}")
            return NO_HIT

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if self.cache.planner is not None and tokens > 0:
            self.cache.planner.observe_prefill(tokens, seconds)

    def store_later(self, prompt_ids: list[int], latent: torch.Tensor, tenant: str = "") -> None:
        with self._lock:
            if self._pending >= self.max_pending:
                metrics.CACHE_WRITES_DROPPED.inc()
                return
            self._pending += 1
        self._writer.submit(self._store, list(prompt_ids), latent, tenant)

    def _store(self, prompt_ids: list[int], latent: torch.Tensor, tenant: str) -> None:
        try:
            self.cache.store(prompt_ids, latent, tenant)
        except Exception as exc:
            log.warning("prefix_cache_store_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._pending -= 1

    async def close(self, timeout_s: float = 10.0) -> None:
        """Lets queued writes finish for at most `timeout_s` (pages not written are only lost
        hits)."""
        await asyncio.wait_for(asyncio.to_thread(self._writer.shutdown, wait=True), timeout_s)
