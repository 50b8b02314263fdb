"""`epserve serve prefill`: a data-parallel attention instance for prompts."""

from __future__ import annotations

import asyncio
import sys

import structlog

from services.attention.service import AttentionService
from services.engine.mtp_drafter import MTPDrafter
from services.prefill import metrics
from services.prefill.config import PrefillConfig
from services.prefill.core import PrefillCore
from services.prefill.decode_members import DecodeMembers
from services.prefill.prefix_reuse import PrefixReuse
from services.prefill.prefix_setup import PrefixSetup
from services.prefill.server import PrefillServicer
from services.protos_gen.epserve.v1 import control_pb2, serving_pb2_grpc

log = structlog.get_logger("prefill")


class PrefillService(AttentionService):
    role = "prefill"

    prefix: PrefixSetup | None = None
    reuse: PrefixReuse | None = None
    advertiser: asyncio.Task | None = None

    def build_core(self) -> None:
        cfg = self.cfg
        if cfg.kv_cache_dir:
            self.prefix = PrefixSetup(cfg, self.model_cfg, self.dtype)
            self.reuse = PrefixReuse(self.prefix.cache)
        model = self.engine.model
        drafter = (lambda cache: MTPDrafter(model, cache)) if self.loads_mtp() else None
        self.core = PrefillCore(self.model_cfg, self.engine.forward, self.dtype, cfg.device,
                                cfg.max_batch_tokens, cfg.max_queue, cfg.block_size,
                                prefix=self.reuse, chunk_tokens=cfg.chunk_tokens,
                                drafter=drafter, forward_tokens=self.engine.forward_tokens)
        self.servicer = PrefillServicer(self.core, self.instance_id, cfg.transfer_timeout_s,
                                        cfg.kv_chunk_bytes)

    def add_servicers(self, server) -> None:
        serving_pb2_grpc.add_PrefillServicer_to_server(self.servicer, server)

    async def setup(self) -> None:
        await super().setup()
        # Heard from before serving: the decode instances KV may be pushed to.
        self.servicer.decode_members = await DecodeMembers().subscribe(self.nc)

    async def until_ready(self) -> None:
        await super().until_ready()
        if self.prefix is not None:
            self.advertiser = asyncio.create_task(
                self.prefix.advertise_forever(self.nc, self.instance_id))

    def load(self) -> control_pb2.InstanceLoad:  # called every heartbeat: refresh the gauges too
        load = self.core.load()
        metrics.QUEUE_DEPTH.set(load.queued_requests)
        metrics.QUEUED_TOKENS.set(load.queued_tokens)
        return load.to_proto()

    async def stop_work(self) -> None:
        await super().stop_work()
        await self.servicer.close()
        if self.servicer.decode_members is not None:
            await self.servicer.decode_members.close()
        if self.advertiser is not None:
            self.advertiser.cancel()
            await asyncio.gather(self.advertiser, return_exceptions=True)
        if self.reuse is not None:
            try:  # pages still queued for the disk: a bounded wait, they are only future hits
                await self.reuse.close(timeout_s=self.cfg.drain_timeout_s)
            except TimeoutError:
                log.warning("prefix_cache_writes_abandoned")


async def serve(cfg: PrefillConfig) -> int:
    return await PrefillService(cfg).run()


if __name__ == "__main__":
    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(PrefillConfig))))
