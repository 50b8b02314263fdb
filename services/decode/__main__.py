"""`epserve serve decode`: a data-parallel attention instance for generation."""

from __future__ import annotations

import sys

from services.attention.service import AttentionService
from services.decode import metrics
from services.decode.config import DecodeConfig
from services.decode.core import DecodeCore
from services.decode.server import DecodeServicer
from services.engine.kv_cache import LatentKVCache
from services.engine.mtp_drafter import MTPDrafter
from services.engine.speculative import Speculation
from services.protos_gen.epserve.v1 import control_pb2, serving_pb2_grpc


class DecodeService(AttentionService):
    role = "decode"

    def build_core(self) -> None:
        cfg, mc = self.cfg, self.model_cfg
        mtp = self.loads_mtp()
        cache = LatentKVCache(mc.num_hidden_layers, mc.latent_dim, cfg.kv_blocks, cfg.block_size,
                              self.dtype, cfg.device, draft_layers=1 if mtp else 0)
        speculation = Speculation(MTPDrafter(self.engine.model, cache)) if mtp else None
        self.core = DecodeCore(mc, self.engine.forward, cache, cfg.max_batch, cfg.admission_wait_s,
                               speculation, self.engine.forward_tokens)

    def add_servicers(self, server) -> None:
        serving_pb2_grpc.add_DecodeServicer_to_server(
            DecodeServicer(self.core, self.instance_id, self.dtype), server)

    def load(self) -> control_pb2.InstanceLoad:  # called every heartbeat: refresh the gauges too
        load = self.core.load()
        metrics.WAITING.set(load.queued_requests)
        metrics.RUNNING.set(load.running_requests)
        metrics.KV_BLOCKS.set(load.kv_blocks_in_use)
        return load.to_proto()


async def serve(cfg: DecodeConfig) -> int:
    return await DecodeService(cfg).run()


if __name__ == "__main__":
    import asyncio

    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(DecodeConfig))))
