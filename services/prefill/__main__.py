"""`epserve serve prefill`: a data-parallel attention instance for prompts."""

from __future__ import annotations

import sys

from services.attention.service import AttentionService
from services.prefill import metrics
from services.prefill.config import PrefillConfig
from services.prefill.core import PrefillCore
from services.prefill.server import PrefillServicer
from services.protos_gen.epserve.v1 import control_pb2, serving_pb2_grpc


class PrefillService(AttentionService):
    role = "prefill"

    def build_core(self) -> None:
        cfg = self.cfg
        self.core = PrefillCore(self.model_cfg, self.engine.forward, self.dtype, cfg.device,
                                cfg.max_batch_tokens, cfg.max_queue, cfg.block_size)
        self.servicer = PrefillServicer(self.core, self.instance_id, cfg.transfer_timeout_s,
                                        cfg.kv_chunk_bytes)

    def add_servicers(self, server) -> None:
        serving_pb2_grpc.add_PrefillServicer_to_server(self.servicer, server)

    def load(self) -> control_pb2.InstanceLoad:  # called every heartbeat: refresh the gauges too
        load = self.core.load()
        metrics.QUEUE_DEPTH.set(load.queued_requests)
        metrics.QUEUED_TOKENS.set(load.queued_tokens)
        return load.to_proto()

    async def stop_work(self) -> None:
        await super().stop_work()
        await self.servicer.close()


async def serve(cfg: PrefillConfig) -> int:
    return await PrefillService(cfg).run()


if __name__ == "__main__":
    import asyncio

    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(PrefillConfig))))
