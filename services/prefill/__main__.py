"""`epserve serve prefill`: a data-parallel attention instance for prompts."""

from __future__ import annotations

import sys

from services.attention.service import AttentionService
from services.model.loader import parse_dtype
from services.prefill import metrics
from services.prefill.config import PrefillConfig
from services.prefill.core import PrefillCore
from services.prefill.server import PrefillServicer
from services.protos_gen.epserve.v1 import control_pb2, serving_pb2_grpc


async def serve(cfg: PrefillConfig) -> int:
    svc = AttentionService(cfg, "prefill")

    async def forward(ids, batch, caches):
        metrics.BATCH_TOKENS.observe(ids.numel())
        return await svc.instance.forward(ids, batch, caches)

    core = PrefillCore(svc.model_cfg, forward, parse_dtype(cfg.dtype), cfg.device,
                       cfg.max_batch_tokens, cfg.max_queue, cfg.block_size)
    servicer = PrefillServicer(core, svc.instance_id, cfg.transfer_timeout_s, cfg.kv_chunk_bytes)

    def load() -> control_pb2.InstanceLoad:  # called every heartbeat: refresh the gauges too
        figures = core.load()
        metrics.QUEUE_DEPTH.set(figures["queued_requests"])
        metrics.QUEUED_TOKENS.set(figures["queued_tokens"])
        return control_pb2.InstanceLoad(**figures)

    await svc.start(lambda server: serving_pb2_grpc.add_PrefillServicer_to_server(servicer, server),
                    load)
    core.start()

    async def stop_core() -> None:
        await core.stop()
        await servicer.close()

    return await svc.run_until_stopped(core.finish_in_flight, stop_core)


if __name__ == "__main__":
    import asyncio

    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(PrefillConfig))))
