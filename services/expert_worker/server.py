"""gRPC shell of the expert worker: proto <-> core, in-band stream errors.

A dispatch's compute runs on the event loop when dispatches of its size were measured short
(engine/compute_thread.py's rule, ≤ INLINE_MAX_S), else on one compute thread: handing a short
compute to a thread costs two wake-ups per message, which on shared cores is a wait for a core
each time (measured on 2 cores, `bench_cluster`: worker recv->reply minus compute fell from
14.6 s to 3.6 s at concurrency 1), while a long one on the loop would hold back heartbeats (an
instance silent for 1.5 s is dead) and control traffic. `compute_thread` always uses the thread.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog

from services.engine.compute_thread import ComputeThread
from services.engine.overlap_tuner import size_bucket
from services.engine.tensor_proto import dtype_from_proto, from_proto, proto_fields
from services.engine.wire import WireError
from services.expert_worker.core import DispatchInput, DispatchRejected, ExpertWorkerCore
from services.expert_worker.metrics import WorkerMetrics
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2

log = structlog.get_logger("expert_worker")


def _input(req: expert_pb2.DispatchRequest) -> DispatchInput:
    try:
        return DispatchInput(
            step_id=req.step_id, micro_batch=req.micro_batch, layer_id=req.layer_id,
            placement_version=req.placement_version, hidden=from_proto(req.hidden),
            slots=from_proto(req.slots), weights=from_proto(req.weights),
            combine_dtype=dtype_from_proto(req.combine_dtype),
        )
    except WireError as exc:
        raise DispatchRejected("INVALID_ARGUMENT", str(exc)) from exc


class ExpertWorkerServicer(expert_pb2_grpc.ExpertWorkerServicer):
    def __init__(self, core: ExpertWorkerCore, info: expert_pb2.WorkerInfo,
                 metrics: WorkerMetrics, compute_thread: bool = False) -> None:
        self.core, self.info, self.metrics = core, info, metrics
        self.compute = ComputeThread()  # one thread keeps the work ordered, as the loop does
        self.always_thread = compute_thread
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def _handle(self, req: expert_pb2.DispatchRequest) -> expert_pb2.DispatchResponse:
        self.in_flight += 1
        self.idle.clear()
        t0 = time.perf_counter()
        try:
            self.core.check_header(req.placement_version, req.layer_id)
            out = await self._run(_input(req), req.hidden.shape[0] if req.hidden.shape else 0)
            reply = expert_pb2.DispatchResponse(
                step_id=req.step_id, micro_batch=req.micro_batch, layer_id=req.layer_id,
                combined=proto_fields(out.combined), compute_seconds=out.compute_seconds)
            self.metrics.observe(req, time.perf_counter() - t0, out.compute_seconds)
        except DispatchRejected as exc:
            reply = expert_pb2.DispatchResponse(
                step_id=req.step_id, micro_batch=req.micro_batch, layer_id=req.layer_id,
                error={"code": exc.code, "message": exc.message})
            self.metrics.rejected.labels(code=exc.code).inc()
            log.warning("dispatch_rejected", code=exc.code, reason=exc.message,
                        layer=req.layer_id, step=req.step_id, tag=req.trace_tag)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        return reply

    async def _run(self, inp, tokens: int):
        key = None if self.always_thread else size_bucket(tokens)
        return (await self.compute.run(self.core.run, inp, inline_key=key))[2]

    async def Dispatch(self, request_iterator, context):  # noqa: N802 (gRPC naming)
        async for req in request_iterator:
            yield await self._handle(req)

    async def DispatchOnce(self, request, context):  # noqa: N802
        reply = await self._handle(request)
        if reply.HasField("error"):
            await context.abort(getattr(grpc.StatusCode, reply.error.code), reply.error.message)
        return reply

    async def Info(self, request, context):  # noqa: N802
        return self.info

    async def Load(self, request, context):  # noqa: N802
        loads = self.core.load(reset=request.reset)
        reply = expert_pb2.ExpertLoad(rank=self.core.rank,
                                      placement_version=self.core.placement_version)
        for layer, (slots, tokens) in sorted(loads.items()):
            reply.layers.add(layer_id=layer, slots=slots, tokens=tokens)
        return reply

    async def wait_idle(self) -> None:
        await self.idle.wait()


def combine_dtype_proto(name: str) -> int:
    return {"fp32": tensor_pb2.DTYPE_FP32, "bf16": tensor_pb2.DTYPE_BF16}[name]
