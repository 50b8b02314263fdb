"""gRPC shell of the decode instance: Generate (token stream) and TransferKV."""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog
import torch

from services.common.logging import bind_request
from services.decode import metrics
from services.decode.core import DecodeCore, Rejected
from services.engine.kv_transfer import KVAssembler, TransferError
from services.engine.reference import check_internal_request
from services.engine.sampling_proto import logprobs_to_proto, params_from_proto
from services.protos_gen.epserve.v1 import serving_pb2, serving_pb2_grpc

log = structlog.get_logger("decode")
QUEUED_EVERY_S = 1.0
ALIVE_EVERY_S = 1.0


class DecodeServicer(serving_pb2_grpc.DecodeServicer):
    def __init__(self, core: DecodeCore, instance_id: str, dtype: torch.dtype) -> None:
        self.core, self.instance_id, self.dtype = core, instance_id, dtype

    async def Generate(self, request, context):  # noqa: N802 (gRPC naming)
        rid = request.request_id
        with bind_request(rid):
            try:
                params = params_from_proto(request.sampling)
                if params.temperature > 0 and params.seed is None:
                    raise ValueError("sampling needs a seed (the router sets one)")
                check_internal_request(self.core.cfg, rid, request.prompt_ids, params,
                                       request.step_offset)
            except ValueError as exc:
                metrics.REQUESTS.labels(outcome="invalid").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{rid}: {exc}")
            admit = asyncio.ensure_future(self.core.admit(
                rid, list(request.prompt_ids), params, request.step_offset))
            try:
                # While the request waits for KV room, say so every QUEUED_EVERY_S: the router
                # tells a waiting instance from a stalled one by these.
                while not (await asyncio.wait({admit}, timeout=QUEUED_EVERY_S))[0]:
                    load = self.core.load()
                    yield serving_pb2.DecodeEvent(queued=serving_pb2.DecodeQueued(
                        free_blocks=load.kv_blocks_total - load.kv_blocks_in_use))
                slot = admit.result()
            except Rejected as exc:
                metrics.REQUESTS.labels(outcome=exc.code.lower()).inc()
                await context.abort(exc.status, f"{rid}: {exc.message}")
            finally:
                if not admit.done():  # the router went away while we waited
                    admit.cancel()
            self._gauges()
            yield serving_pb2.DecodeEvent(accepted=serving_pb2.DecodeAccepted(
                instance_id=self.instance_id, reserved_blocks=slot.blocks))
            finished = False
            last = None
            try:
                while True:
                    try:
                        kind, a, b = await asyncio.wait_for(slot.events.get(), ALIVE_EVERY_S)
                    except TimeoutError:  # no token for a while: say the request lives here
                        yield serving_pb2.DecodeEvent(alive=serving_pb2.DecodeAlive(
                            tokens=slot.emitted))
                        continue
                    if kind == "token":
                        now = time.monotonic()
                        if last is not None:
                            metrics.TPOT.observe(now - last)
                        last = now
                        metrics.TOKENS.inc()
                        token = serving_pb2.DecodeToken(seq=a, token_id=b)
                        if slot.seq.params.logprobs is not None:
                            token.logprobs.CopyFrom(logprobs_to_proto(slot.seq.logprobs[a]))
                        yield serving_pb2.DecodeEvent(token=token)
                    elif kind == "finished":
                        finished = True
                        metrics.REQUESTS.labels(outcome="finished").inc()
                        yield serving_pb2.DecodeEvent(finished=serving_pb2.DecodeFinished(
                            finish_reason=a, completion_tokens=b))
                        return
                    else:
                        finished = True
                        metrics.REQUESTS.labels(outcome="error").inc()
                        await context.abort(grpc.StatusCode[a], f"{request.request_id}: {b}")
            finally:
                if not finished:  # the router cancelled: free the slot now
                    metrics.REQUESTS.labels(outcome="cancelled").inc()
                    self.core.cancel(request.request_id)
                self._gauges()

    async def TransferKV(self, request_iterator, context):  # noqa: N802
        asm = KVAssembler()
        try:
            async for chunk in request_iterator:
                asm.add(chunk)
            latent = asm.tensor(self.dtype)
            with bind_request(asm.request_id):
                self.core.install_kv(asm.request_id, latent, asm.first_token,
                                     asm.first_token_logprobs, asm.draft(self.dtype))
                log.info("kv_installed", tokens=latent.shape[1], bytes=asm.received)
        except (TransferError, Rejected) as exc:
            metrics.KV_TRANSFERS.labels(outcome=exc.code.lower()).inc()
            log.warning("kv_transfer_rejected", request_id=asm.request_id, code=exc.code,
                        reason=exc.message)
            await context.abort(exc.status,
                                f"{asm.request_id or '?'}: {exc.message}")
        metrics.KV_TRANSFERS.labels(outcome="ok").inc()
        metrics.KV_BYTES.inc(asm.received)
        return serving_pb2.KVTransferAck(request_id=asm.request_id, bytes=asm.received)

    def _gauges(self) -> None:
        load = self.core.load()
        metrics.RUNNING.set(load.running_requests)
        metrics.KV_BLOCKS.set(load.kv_blocks_in_use)
