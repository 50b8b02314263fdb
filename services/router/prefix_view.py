"""What each prefill instance's prefix-cache memory tier holds, as the instances advertise it
(NATS `epserve.prefix_cache.<instance>`, every second while it changes), for cache-aware
prefill routing: the prompt's page keys are computed here, with the same hash chain the
instances use (services/prefix_cache/keys.py), and matched exactly against each instance's set.

A routing hint only: an instance whose advertisement is stale or lost simply counts no hits,
and a page evicted since its last advertisement is computed again, never served wrong (the
prefill instance verifies every page it reads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from services.prefix_cache.keys import PAGE_TOKENS, namespace_key, page_keys, tenant_root
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("router")
PREFIX_BYTES = 16  # of each key, as advertised


@dataclass
class _Held:
    fingerprint: str
    layout: str
    prefixes: frozenset[bytes]
    heard_at: float


class PrefixCacheView:
    def __init__(self, clock: Callable[[], float], stale_after_s: float = 10.0) -> None:
        self.clock, self.stale_after_s = clock, stale_after_s
        self._held: dict[str, _Held] = {}
        self._namespaces: dict[tuple[str, str, str], bytes] = {}

    def on_message(self, data: bytes) -> None:
        msg = control_pb2.PrefixCacheKeys()
        try:
            msg.ParseFromString(data)
        except Exception:
            return
        raw = msg.key_prefixes
        if not msg.instance_id or len(raw) % PREFIX_BYTES:
            return
        prefixes = frozenset(raw[k:k + PREFIX_BYTES] for k in range(0, len(raw), PREFIX_BYTES))
        self._held[msg.instance_id] = _Held(msg.model_fingerprint, msg.kv_layout, prefixes,
                                            self.clock())

    def cached_tokens(self, prompt_ids: Sequence[int], tenant: str = "") -> dict[str, int]:
        """instance id -> prompt tokens (whole pages from token 0) its memory tier holds."""
        now, out = self.clock(), {}
        if len(prompt_ids) < PAGE_TOKENS:
            return out
        keys_by_namespace: dict[bytes, list[bytes]] = {}
        for instance_id, held in list(self._held.items()):
            if now - held.heard_at > self.stale_after_s:
                del self._held[instance_id]
                continue
            ns = self._namespace(held.fingerprint, held.layout, tenant)
            if ns not in keys_by_namespace:
                keys_by_namespace[ns] = page_keys(ns, prompt_ids)
            pages = 0
            for key in keys_by_namespace[ns]:
                if key[:PREFIX_BYTES] not in held.prefixes:
                    break
                pages += 1
            if pages:
                out[instance_id] = pages * PAGE_TOKENS
        return out

    def _namespace(self, fingerprint: str, layout: str, tenant: str) -> bytes:
        key = (fingerprint, layout, tenant)
        if key not in self._namespaces:
            self._namespaces[key] = tenant_root(namespace_key(fingerprint, layout), tenant)
        return self._namespaces[key]
