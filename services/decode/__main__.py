"""`epserve serve decode`: a data-parallel attention instance for generation."""

from __future__ import annotations

import sys

from services.attention.service import AttentionService
from services.decode import metrics
from services.decode.config import DecodeConfig
from services.decode.core import DecodeCore
from services.decode.server import DecodeServicer, timed_forward
from services.engine.kv_cache import LatentKVCache
from services.model.loader import parse_dtype
from services.protos_gen.epserve.v1 import control_pb2, serving_pb2_grpc


async def serve(cfg: DecodeConfig) -> int:
    svc = AttentionService(cfg, "decode")
    mc = svc.model_cfg
    dtype = parse_dtype(cfg.dtype)
    cache = LatentKVCache(mc.num_hidden_layers, mc.latent_dim, cfg.kv_blocks, cfg.block_size,
                          dtype, cfg.device)
    core = DecodeCore(mc, lambda ids, b, c: timed_forward(svc.instance, ids, b, c), cache,
                      cfg.max_batch, cfg.admission_wait_s)

    def load() -> control_pb2.InstanceLoad:  # called every heartbeat: refresh the gauges too
        figures = core.load()
        metrics.WAITING.set(figures["queued_requests"])
        metrics.RUNNING.set(figures["running_requests"])
        metrics.KV_BLOCKS.set(figures["kv_blocks_in_use"])
        return control_pb2.InstanceLoad(**figures)

    await svc.start(lambda server: serving_pb2_grpc.add_DecodeServicer_to_server(
        DecodeServicer(core, svc.instance_id, dtype), server), load)
    core.start()
    return await svc.run_until_stopped(core.finish_in_flight, core.stop)


if __name__ == "__main__":
    import asyncio

    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(DecodeConfig))))
