"""Building a prefill instance's prefix cache from its settings, and advertising what its
memory tier holds (for the routers' cache-aware choice, services/router/prefix_view.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import structlog

from services.common import subjects
from services.model.config import ModelConfig
from services.prefill.config import PrefillConfig
from services.prefix_cache.cache import PrefixCache
from services.prefix_cache.disk_store import DiskPageStore
from services.prefix_cache.keys import kv_layout, model_fingerprint, namespace_key
from services.prefix_cache.memory_tier import MemoryTier
from services.prefix_cache.planner import ReadPlanner
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("prefill")
ADVERTISE_EVERY_S = 1.0
ADVERTISE_AT_LEAST_S = 5.0  # even when nothing changed: routers drop silent instances
KEY_PREFIX_BYTES = 16


class PrefixSetup:
    def __init__(self, cfg: PrefillConfig, model_cfg: ModelConfig, dtype) -> None:
        self.fingerprint = cfg.kv_cache_namespace or model_fingerprint(cfg.model)
        self.layout = kv_layout(model_cfg.num_hidden_layers, model_cfg.latent_dim, dtype)
        namespace = namespace_key(self.fingerprint, self.layout)
        self.disk = DiskPageStore(Path(cfg.kv_cache_dir), cfg.kv_cache_bytes, namespace,
                                  read_delay_s=cfg.kv_cache_read_delay_s)
        self.disk.scan()  # a restart keeps the pages written before it
        self.cache = PrefixCache(namespace,
                                 (model_cfg.num_hidden_layers, model_cfg.latent_dim, dtype),
                                 self.disk, MemoryTier(cfg.kv_cache_memory_bytes)
                                 if cfg.kv_cache_memory_bytes else None, ReadPlanner())
        self.rescan_s = cfg.kv_cache_rescan_s
        log.info("prefix_cache_ready", dir=cfg.kv_cache_dir, pages=len(self.disk),
                 fingerprint=self.fingerprint[:16], layout=self.layout)

    async def advertise_forever(self, nc, instance_id: str) -> None:
        """Until cancelled: the memory tier's keys when they change (and every few seconds),
        and the directory re-read every rescan_s."""
        last, last_sent = None, 0.0
        while True:
            await asyncio.sleep(ADVERTISE_EVERY_S)
            try:
                await asyncio.to_thread(self.disk.rescan_if_due, time.time(), self.rescan_s)
                keys = sorted(k[:KEY_PREFIX_BYTES] for k in self.cache.memory_keys())
                now = time.monotonic()
                if keys == last and now - last_sent < ADVERTISE_AT_LEAST_S:
                    continue
                msg = control_pb2.PrefixCacheKeys(
                    instance_id=instance_id, model_fingerprint=self.fingerprint,
                    kv_layout=self.layout, key_prefixes=b"".join(keys), sent_at=time.time())
                await nc.publish(subjects.prefix_cache(instance_id), msg.SerializeToString())
                last, last_sent = keys, now
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away, a disk error: try again next time
                log.warning("prefix_cache_advertise_failed", error=f"{type(exc).__name__}: {exc}")
