"""gRPC shell of the prefill instance: run the prompt, push its KV to the decode instance."""

from __future__ import annotations

import time

import grpc
import structlog

from services.common.channels import Channels
from services.common.logging import bind_request
from services.engine.ep_client import EPError
from services.engine.kv_transfer import kv_chunks
from services.engine.reference import check_internal_request
from services.engine.sampling_proto import params_from_proto
from services.prefill import metrics
from services.prefill.core import PrefillCore, QueueFull
from services.prefill.decode_members import DecodeMembers
from services.protos_gen.epserve.v1 import serving_pb2, serving_pb2_grpc

log = structlog.get_logger("prefill")


# A KV transfer is given this long plus its bytes at this rate (capped by
# --transfer-timeout-s): a decode instance that stalls mid-transfer fails the transfer in about
# a second for a small KV, not after the configured timeout.
TRANSFER_FLOOR_S = 2.0
TRANSFER_MIN_BYTES_PER_S = 20e6
# A decode instance the router heard before this process did: wait this long for its heartbeat.
MEMBER_WAIT_S = 2.0


def transfer_deadline(nbytes: int, cap_s: float) -> float:
    return min(cap_s, TRANSFER_FLOOR_S + nbytes / TRANSFER_MIN_BYTES_PER_S)


class PrefillServicer(serving_pb2_grpc.PrefillServicer):
    def __init__(self, core: PrefillCore, instance_id: str, transfer_timeout_s: float,
                 chunk_bytes: int) -> None:
        self.core, self.instance_id = core, instance_id
        self.transfer_timeout_s, self.chunk_bytes = transfer_timeout_s, chunk_bytes
        self.channels = Channels(role="decode")  # mTLS: only a decode certificate answers
        # The decode instances KV may go to (decode_members.py; set by the service).
        self.decode_members: DecodeMembers | None = None

    def _decode_stub(self, endpoint: str) -> serving_pb2_grpc.DecodeStub:
        return serving_pb2_grpc.DecodeStub(self.channels.get(endpoint))

    async def Prefill(self, request, context):  # noqa: N802 (gRPC naming)
        rid = request.request_id
        with bind_request(rid):
            if self.core.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{rid}: prefill instance is draining")
            if not request.prompt_ids or not request.decode_endpoint:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{rid}: prompt_ids and decode_endpoint are required")
            try:
                params = params_from_proto(request.sampling)
                if params.temperature > 0 and params.seed is None:
                    raise ValueError("sampling needs a seed (the router sets one)")
                check_internal_request(self.core.cfg, rid, request.prompt_ids, params,
                                       request.step_offset)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{rid}: {exc}")
            if self.decode_members is not None and not await self.decode_members.wait_member(
                    request.decode_endpoint, MEMBER_WAIT_S):
                metrics.REQUESTS.labels(outcome="not_a_member").inc()
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{rid}: decode_endpoint {request.decode_endpoint!r} is not "
                                    f"a decode instance of this cluster (no decode heartbeat "
                                    f"names it); refusing to send KV there")
            try:
                out = await self.core.submit(rid, list(request.prompt_ids), params,
                                             request.step_offset, request.tenant)
            except QueueFull as exc:
                metrics.REQUESTS.labels(outcome="queue_full").inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{rid}: {exc}")
            except EPError as exc:
                metrics.REQUESTS.labels(outcome="expert_error").inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{rid}: expert workers: {exc}")
            except Exception as exc:  # a bug: still a status with the request id, not UNKNOWN
                metrics.REQUESTS.labels(outcome="error").inc()
                log.exception("prefill_crashed")
                await context.abort(grpc.StatusCode.INTERNAL, f"{rid}: prefill failed: {exc}")
            metrics.PREFILL_SECONDS.observe(out.seconds)
            t0 = time.perf_counter()
            nbytes = out.latent.numel() * out.latent.element_size()
            if out.draft is not None:
                nbytes += out.draft.latent.numel() * out.draft.latent.element_size()
            try:
                ack = await self._decode_stub(request.decode_endpoint).TransferKV(
                    kv_chunks(rid, out.latent, out.first_token, self.chunk_bytes,
                              out.first_logprobs, out.draft),
                    timeout=transfer_deadline(nbytes, self.transfer_timeout_s))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:  # an earlier attempt's arrived
                    metrics.REQUESTS.labels(outcome="already_installed").inc()
                    return serving_pb2.PrefillResult(
                        instance_id=self.instance_id, first_token=out.first_token,
                        prompt_tokens=len(request.prompt_ids), prefill_seconds=out.seconds,
                        cached_tokens=out.cached_tokens)
                metrics.REQUESTS.labels(outcome="transfer_failed").inc()
                log.warning("kv_transfer_failed", decode=request.decode_endpoint,
                            code=exc.code().name, reason=exc.details())
                code = grpc.StatusCode.DATA_LOSS if exc.code() == grpc.StatusCode.DATA_LOSS \
                    else grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"{rid}: KV transfer to {request.decode_endpoint} "
                                          f"failed: {exc.code().name} {exc.details()}")
            transfer = time.perf_counter() - t0
            metrics.TRANSFER_SECONDS.observe(transfer)
            metrics.REQUESTS.labels(outcome="ok").inc()
            metrics.KV_BYTES.inc(ack.bytes)
            return serving_pb2.PrefillResult(
                instance_id=self.instance_id, first_token=out.first_token,
                prompt_tokens=len(request.prompt_ids), prefill_seconds=out.seconds,
                transfer_seconds=transfer, kv_bytes=ack.bytes, cached_tokens=out.cached_tokens)

    async def close(self) -> None:
        await self.channels.close()
