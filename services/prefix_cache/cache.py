"""The prefix cache a prefill instance calls: the longest cached prefix of a prompt, and the
pages of a prompt it computed.

A hit is a run of whole pages from token 0: page i is usable only with pages 0..i-1, so the
walk stops at the first page found nowhere (or damaged, or not worth reading from disk). The
memory tier is asked first, then the disk, and pages read from disk are kept in memory.
Latents come back on the CPU in the layout's dtype, exactly as stored.

Thread-safety: lookup and store may run on different threads at once. The facade keeps no
mutable state of its own; the memory tier, the disk store and the planner each guard theirs
with a lock (the disk store never holds one across an fsync, so a store does not stall a
lookup). Two threads putting the same page put the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import torch

from services.prefix_cache import metrics
from services.prefix_cache.disk_store import DiskPageStore
from services.prefix_cache.keys import NO_PARENT, PAGE_TOKENS, kv_layout, page_keys, tenant_root
from services.prefix_cache.memory_tier import MemoryTier
from services.prefix_cache.page_file import HEADER_SIZE, bytes_to_latent, latent_to_bytes
from services.prefix_cache.planner import ReadPlanner

log = structlog.get_logger("prefix_cache")


@dataclass(frozen=True)
class CacheHit:
    tokens: int  # a multiple of PAGE_TOKENS, counted from token 0
    latent: torch.Tensor | None  # [layers, tokens, latent_dim]; None when tokens == 0
    from_memory: int  # pages
    from_disk: int  # pages


class PrefixCache:
    def __init__(self, namespace: bytes, layout: tuple[int, int, torch.dtype],
                 disk: DiskPageStore | None, memory: MemoryTier | None,
                 planner: ReadPlanner | None = None) -> None:
        num_layers, latent_dim, dtype = layout
        self.layout_name = kv_layout(num_layers, latent_dim, dtype)  # validates the layout
        if disk is not None and disk.namespace != namespace:
            raise ValueError("the disk store was opened for another namespace")
        self.namespace = namespace
        self.num_layers, self.latent_dim, self.dtype = num_layers, latent_dim, dtype
        self.disk, self.memory, self.planner = disk, memory, planner
        self.page_shape = (num_layers, PAGE_TOKENS, latent_dim)
        self.page_file_bytes = HEADER_SIZE + num_layers * PAGE_TOKENS * latent_dim * \
            torch.empty((), dtype=dtype).element_size()

    def lookup(self, token_ids: Sequence[int], tenant: str = "") -> CacheHit:
        keys = page_keys(tenant_root(self.namespace, tenant), token_ids)
        pages: list[torch.Tensor] = []  # each [layers, PAGE_TOKENS, latent_dim]
        from_memory = from_disk = 0
        for i, key in enumerate(keys):
            page = self.memory.get(key) if self.memory is not None else None
            if page is not None:
                from_memory += 1
            else:
                page = self._read_disk(key, remaining=len(keys) - i)
                if page is None:
                    break
                from_disk += 1
            pages.append(page)
        tokens = len(pages) * PAGE_TOKENS
        metrics.LOOKUP_TOKENS.labels(source="memory").inc(from_memory * PAGE_TOKENS)
        metrics.LOOKUP_TOKENS.labels(source="disk").inc(from_disk * PAGE_TOKENS)
        metrics.LOOKUP_TOKENS.labels(source="miss").inc(len(token_ids) - tokens)
        latent = torch.cat(pages, dim=1) if pages else None
        return CacheHit(tokens, latent, from_memory, from_disk)

    def _read_disk(self, key: bytes, remaining: int) -> torch.Tensor | None:
        if self.disk is None:
            return None
        if self.planner is not None and not self.planner.worth_reading(
                remaining * self.page_file_bytes, remaining * PAGE_TOKENS):
            metrics.DISK_SKIPPED.inc()
            return None
        start = time.perf_counter()
        payload = self.disk.read(key)
        elapsed = time.perf_counter() - start
        if payload is None:
            return None
        if self.planner is not None:
            self.planner.observe_read(HEADER_SIZE + len(payload), elapsed)
        try:
            page = bytes_to_latent(payload, self.page_shape, self.dtype)
        except ValueError:
            # Intact but of another layout: only an operator's namespace override can do this.
            self.disk.discard(key, "length", detail="payload does not match the layout")
            return None
        if self.memory is not None:
            self.memory.put(key, page)
        return page

    def store(self, token_ids: Sequence[int], latent: torch.Tensor, tenant: str = "") -> int:
        """Keep every full page of the prompt (latent: [layers, len(token_ids), latent_dim])
        in memory and on disk, in chain order; returns the pages written to disk. Synchronous:
        the caller runs it off its event loop."""
        expected = (self.num_layers, len(token_ids), self.latent_dim)
        if tuple(latent.shape) != expected:
            raise ValueError(f"latent shape {tuple(latent.shape)} != {expected}")
        if latent.dtype != self.dtype:
            raise ValueError(f"latent dtype {latent.dtype} != the layout's {self.dtype}")
        keys = page_keys(tenant_root(self.namespace, tenant), token_ids)
        if not keys:
            return 0
        host = latent[:, :len(keys) * PAGE_TOKENS].detach().to("cpu")  # one copy off the GPU
        written = 0
        disk_chain = self.disk is not None
        for i, key in enumerate(keys):
            # A compact copy: a view would pin the whole prompt's tensor in the memory tier.
            page = host[:, i * PAGE_TOKENS:(i + 1) * PAGE_TOKENS].clone(
                memory_format=torch.contiguous_format)
            if self.memory is not None and self.memory.get(key) is None:
                self.memory.put(key, page)
            if not disk_chain or self.disk.contains(key):
                continue
            parent = keys[i - 1] if i else NO_PARENT
            if self.disk.write(key, parent, PAGE_TOKENS, latent_to_bytes(page)):
                written += 1
            elif not self.disk.contains(key):
                # The parent was evicted meanwhile, or the disk failed: later pages would be
                # orphans the store refuses anyway.
                log.info("prefix_cache_store_chain_broken", page=i, pages=len(keys))
                disk_chain = False
        return written

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A measured forward pass, for the planner's recompute-speed estimate."""
        if self.planner is not None:
            self.planner.observe_prefill(tokens, seconds)

    def memory_keys(self) -> list[bytes]:
        """The pages this instance holds in memory (least recently used first), to advertise."""
        return self.memory.keys() if self.memory is not None else []
