"""One request's path through the cluster: reserve on a decode instance, prefill, relay tokens.

1. Decode.Generate on a chosen decode instance; its first event says the KV budget is reserved
   (a refusal — full, draining — moves on to another instance, up to `decode_attempts`).
2. Prefill.Prefill on a chosen prefill instance, naming the decode instance: it runs the prompt,
   samples token 0 and pushes the latent KV there. A failed prefill or transfer (the decode
   side fails closed and keeps the reservation) is re-driven on another instance.
3. Tokens stream back from decode with seq numbers, are checked (no gap, no duplicate),
   detokenised (UTF-8 safe) and relayed. Leaving early for any reason cancels the decode call,
   which frees the decode slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from services.common.channels import Channels
from services.engine.sampling_proto import params_to_proto
from services.model.detokenizer import IncrementalDetokenizer
from services.model.tokenizer import Tokenizer
from services.protos_gen.epserve.v1 import inference_pb2, serving_pb2, serving_pb2_grpc
from services.router import metrics
from services.router.choice import InstanceChooser, NoInstance
from services.router.instances import DECODE, PREFILL, InstanceView
from services.router.sequence import SequenceError, TokenSequenceChecker
from services.router.validation import ValidRequest

log = structlog.get_logger("router")
# Codes with which an instance says "not me, not now": try another one.
DECODE_REFUSALS = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
PREFILL_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)


class RequestFailed(Exception):
    """Ends a request with a gRPC status; the message names the request id."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Outcome:
    """What the usage record and the final message report."""

    finish_reason: str = "abort"
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_instance: str = ""
    decode_instance: str = ""
    started_at: float = field(default_factory=time.time)


class RequestFlow:
    def __init__(self, view: InstanceView, chooser: InstanceChooser, channels: Channels,
                 tokenizer: Tokenizer, timeout_s: float, prefill_retries: int,
                 decode_attempts: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.view, self.chooser, self.channels = view, chooser, channels
        self.tokenizer, self.timeout_s = tokenizer, timeout_s
        self.prefill_retries, self.decode_attempts = prefill_retries, decode_attempts
        self.clock = clock

    async def run(self, req: ValidRequest, outcome: Outcome
                  ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        t0 = self.clock()
        deadline = t0 + self.timeout_s
        rid, sampling = req.request_id, params_to_proto(req.sampling)
        call, decode_id, decode_endpoint = await self._open_decode(req, sampling, deadline)
        outcome.decode_instance = decode_id
        prefill = asyncio.create_task(self._prefill(req, sampling, decode_endpoint, deadline,
                                                    outcome))
        checker = TokenSequenceChecker(req.sampling.max_tokens)
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
        finished = False
        last_token_at = None
        read: asyncio.Future | None = None
        try:
            while True:
                read = read or asyncio.ensure_future(call.read())
                waiting = {read} if prefill.done() else {read, prefill}
                done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - self.clock()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"{rid}: no result within {self.timeout_s}s")
                if prefill in done and prefill.exception() is not None:
                    raise prefill.exception()
                if read not in done:
                    continue
                event = _event(read, rid, decode_id)
                read = None
                kind = event.WhichOneof("kind")
                if kind == "token":
                    try:
                        checker.accept(event.token.seq, event.token.token_id)
                    except SequenceError as exc:
                        raise RequestFailed(grpc.StatusCode.INTERNAL, f"{rid}: {exc}") from exc
                    now = self.clock()
                    if last_token_at is None:
                        outcome.ttft_s = now - t0
                        metrics.TTFT.observe(outcome.ttft_s)
                    else:
                        metrics.TPOT.observe(now - last_token_at)
                    last_token_at = now
                    outcome.completion_tokens = checker.received
                    metrics.COMPLETION_TOKENS.inc()
                    yield inference_pb2.GenerateResponse(delta=inference_pb2.TokenDelta(
                        index=event.token.seq, token_ids=[event.token.token_id],
                        text=detok.push(event.token.token_id)))
                elif kind == "finished":
                    try:
                        checker.check_finished(event.finished.completion_tokens)
                    except SequenceError as exc:
                        raise RequestFailed(grpc.StatusCode.INTERNAL, f"{rid}: {exc}") from exc
                    finished = True
                    outcome.finish_reason = event.finished.finish_reason
                    total = self.clock() - t0
                    yield inference_pb2.GenerateResponse(final=inference_pb2.GenerateFinal(
                        request_id=rid, finish_reason=outcome.finish_reason, text=detok.flush(),
                        usage=inference_pb2.Usage(
                            prompt_tokens=len(req.prompt_ids),
                            completion_tokens=checker.received,
                            time_to_first_token_s=outcome.ttft_s, total_time_s=total,
                            prompt_cache_miss_tokens=len(req.prompt_ids))))
                    return
        finally:
            if read is not None:
                read.cancel()
            if not finished:
                call.cancel()  # the decode instance frees the slot when its stream ends
            if not prefill.done():
                prefill.cancel()
            await asyncio.gather(prefill, return_exceptions=True)
            self.chooser.decode_finished(rid)

    async def _open_decode(self, req: ValidRequest, sampling, deadline: float):
        rid, avoid = req.request_id, set()
        last_error, last_code = "", None
        for _ in range(self.decode_attempts):
            eligible = self.view.eligible(DECODE, self.clock())
            try:
                inst = self.chooser.choose_decode(eligible, len(req.prompt_ids),
                                                  req.sampling.max_tokens, avoid)
            except NoInstance as exc:
                # Every instance refused: pass on why (a request that does not fit stays
                # RESOURCE_EXHAUSTED); none serving at all is UNAVAILABLE.
                detail = f"{exc}; {self.view.describe(DECODE, self.clock())}"
                raise RequestFailed(last_code or grpc.StatusCode.UNAVAILABLE,
                                    f"{rid}: {detail}{last_error}") from exc
            # Recorded before the first await: concurrent requests must see each other's
            # choice, or they all pick the same instance between two heartbeats.
            self.chooser.decode_dispatched(inst.instance_id, rid, len(req.prompt_ids),
                                           req.sampling.max_tokens)
            stub = serving_pb2_grpc.DecodeStub(self.channels.get(inst.endpoint))
            call = stub.Generate(serving_pb2.DecodeRequest(
                request_id=rid, prompt_ids=req.prompt_ids, sampling=sampling),
                timeout=max(0.001, deadline - self.clock()))
            try:
                first = await call.read()
            except asyncio.CancelledError:  # the client left while we waited for the decision
                call.cancel()
                self.chooser.decode_finished(rid)
                raise
            except grpc.aio.AioRpcError as exc:
                self.chooser.decode_finished(rid)
                if exc.code() not in DECODE_REFUSALS:
                    raise _failed(exc, rid, f"decode {inst.instance_id}") from exc
                metrics.DECODE_REFUSALS.inc()
                log.info("decode_refused", decode=inst.instance_id, code=exc.code().name,
                         reason=exc.details())
                avoid.add(inst.instance_id)
                last_error = f" (last refusal: {inst.instance_id}: {exc.details()})"
                last_code = exc.code()
                continue
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "accepted":
                call.cancel()
                self.chooser.decode_finished(rid)
                raise RequestFailed(grpc.StatusCode.INTERNAL,
                                    f"{rid}: decode {inst.instance_id} did not accept the request")
            return call, inst.instance_id, inst.endpoint
        raise RequestFailed(last_code or grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{rid}: every decode instance tried refused the request{last_error}")

    async def _prefill(self, req: ValidRequest, sampling, decode_endpoint: str, deadline: float,
                       outcome: Outcome) -> serving_pb2.PrefillResult:
        rid, avoid = req.request_id, set()
        for attempt in range(1 + self.prefill_retries):
            eligible = self.view.eligible(PREFILL, self.clock())
            try:
                inst = self.chooser.choose_prefill(eligible, len(req.prompt_ids), avoid)
            except NoInstance as exc:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                    f"{rid}: {exc}; {self.view.describe(PREFILL, self.clock())}"
                                    ) from exc
            outcome.prefill_instance = inst.instance_id
            self.chooser.prefill_dispatched(inst.instance_id, rid, len(req.prompt_ids))
            stub = serving_pb2_grpc.PrefillStub(self.channels.get(inst.endpoint))
            try:
                return await stub.Prefill(serving_pb2.PrefillRequest(
                    request_id=rid, prompt_ids=req.prompt_ids, sampling=sampling,
                    decode_endpoint=decode_endpoint), timeout=max(0.001, deadline - self.clock()))
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in PREFILL_RETRYABLE and attempt < self.prefill_retries
                log.warning("prefill_failed", prefill=inst.instance_id, code=exc.code().name,
                            reason=exc.details(), retry=retry)
                if not retry:
                    raise _failed(exc, rid, f"prefill {inst.instance_id}") from exc
                metrics.PREFILL_RETRIES.inc()
                avoid.add(inst.instance_id)
            finally:
                self.chooser.prefill_finished(rid)
        raise AssertionError("unreachable")


def _event(read: asyncio.Future, rid: str, decode_id: str) -> serving_pb2.DecodeEvent:
    try:
        event = read.result()
    except grpc.aio.AioRpcError as exc:
        raise _failed(exc, rid, f"decode {decode_id}") from exc
    if event is grpc.aio.EOF:
        raise RequestFailed(grpc.StatusCode.INTERNAL,
                            f"{rid}: decode {decode_id} ended the stream without finishing")
    return event


def _failed(exc: grpc.aio.AioRpcError, rid: str, where: str) -> RequestFailed:
    """An instance's error, passed on with where it happened (the instance already named the
    request id in its message)."""
    code = exc.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        code = grpc.StatusCode.INTERNAL  # the router validated: an instance disagreeing is ours
    details = exc.details() or code.name
    if not details.startswith(rid):
        details = f"{rid}: {details}"
    return RequestFailed(code, f"{details} ({where})")
