"""One attempt of a request on one decode instance (and the prefill instances feeding it).

1. Decode.Generate on a chosen decode instance; its first event says the KV budget is reserved
   (`queued` events come meanwhile while it waits for room). A refusal (full, draining) moves on
   to another instance, up to `decode_attempts`.
2. Prefill.Prefill on a chosen prefill instance, naming that decode instance: it runs the
   prompt, samples the first token and pushes the latent KV there. A failed or stalled prefill
   or transfer (decode fails closed and keeps the reservation) is re-driven on another prefill
   instance; one that finds the KV already installed counts as done.
3. Tokens stream back with seq numbers 0, 1, ... of this attempt.

Every wait has a deadline sized from what the router has measured (services/common/
deadline.py): a decode instance that breaks its stream, ends it early, or stays silent past
the token-gap deadline raises `Migrate`; the flow (flow.py) then starts the next attempt. A
decode instance that is slow, not stalled (a step redone around a lost expert worker), sends
`alive` events meanwhile, so it is not taken for a stalled one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog

from services.common.channels import Channels
from services.common.deadline import ObservedDeadline
from services.common.errors import StatusError
from services.protos_gen.epserve.v1 import inference_pb2, serving_pb2, serving_pb2_grpc
from services.router import metrics
from services.router.choice import InstanceChooser, NoInstance
from services.router.instances import DECODE, PREFILL, InstanceView
from services.router.prefix_view import PrefixCacheView

log = structlog.get_logger("router")
# Codes with which an instance says "not me, not now": try another one.
DECODE_REFUSALS = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
PREFILL_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                     grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.UNKNOWN)
# A decode stream that fails with these is moved; others are the request's own fault.
DECODE_MIGRATABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                     grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS,
                     grpc.StatusCode.ABORTED)


class RequestFailed(StatusError):
    """Ends a request with a gRPC status; the message names the request id."""


class Migrate(Exception):
    """The decode side of an attempt failed or went silent: move the request elsewhere."""

    def __init__(self, reason: str, instance_id: str, code: grpc.StatusCode, message: str,
                 decode_at_fault: bool = True) -> None:
        super().__init__(message)
        self.reason, self.instance_id, self.code, self.message = reason, instance_id, code, message
        self.decode_at_fault = decode_at_fault


@dataclass
class Parts:
    """What every attempt of every request shares (one per router)."""

    view: InstanceView
    chooser: InstanceChooser
    channels: Channels
    clock: Callable[[], float]
    prefill_retries: int
    decode_attempts: int
    instance_wait_s: float  # how long to wait for an eligible instance that is restarting
    token_gaps: ObservedDeadline  # between two tokens of a stream (and before the first)
    prefills: ObservedDeadline  # one Prefill call, by prompt tokens
    prefix_view: PrefixCacheView | None = None  # what prefill instances' caches hold


@dataclass(frozen=True)
class AttemptPlan:
    """What one attempt sends: the prompt (with the tokens already streamed, when migrating),
    the remaining budget and the sampling step of its first token."""

    request_id: str  # this attempt's internal id (decode and prefill key their state by it)
    prompt_ids: list[int]
    sampling: inference_pb2.SamplingParams
    step_offset: int
    tenant: str = ""  # the prefix-cache namespace's tenant


class Attempt:
    def __init__(self, parts: Parts, plan: AttemptPlan, deadline: float, outcome) -> None:
        self.p, self.plan, self.deadline, self.outcome = parts, plan, deadline, outcome

    def _left(self) -> float:
        return max(0.001, self.deadline - self.p.clock())

    async def events(self) -> AsyncIterator[serving_pb2.DecodeEvent]:
        """This attempt's token and finished events; Migrate or RequestFailed otherwise."""
        call, decode = await self._open_decode()
        rid = self.plan.request_id  # as the decode instance accepted it
        self.outcome.decode_instance = decode.instance_id
        prefill = asyncio.create_task(self._prefill(decode.endpoint))
        read: asyncio.Future | None = None
        tokens = 0
        prefill_done_at: float | None = None
        last_event_at = self.p.clock()
        try:
            while True:
                read = read or asyncio.ensure_future(call.read())
                if prefill.done() and prefill_done_at is None:
                    error = prefill.exception()
                    if error is not None and tokens == 0:
                        if isinstance(error, RequestFailed) and error.status in PREFILL_RETRYABLE:
                            # every prefill tried failed (or the transfer to this decode did):
                            # start over on a fresh pair
                            raise Migrate("prefill_failed", decode.instance_id, error.status,
                                          error.message, decode_at_fault=False) from error
                        raise error
                    prefill_done_at = last_event_at = self.p.clock()
                # Silence counts only once the KV is there: before that, prefill has its own
                # deadline (a long prompt, a queue).
                if prefill_done_at is not None or tokens:
                    wait = min(self._left(), self.p.token_gaps.deadline()
                               - (self.p.clock() - last_event_at))
                else:
                    wait = self._left()
                waiting = {read} if prefill.done() else {read, prefill}
                done, _ = await asyncio.wait(waiting, timeout=max(0.0, wait),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if self.deadline - self.p.clock() <= 0:
                        raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            f"{rid}: no result in time")
                    raise Migrate("silent", decode.instance_id, grpc.StatusCode.UNAVAILABLE,
                                  f"decode {decode.instance_id} silent for "
                                  f"{self.p.clock() - last_event_at:.1f}s")
                if read not in done:
                    continue
                event = self._event(read, decode.instance_id)
                read = None
                now = self.p.clock()
                if event.WhichOneof("kind") in ("alive", "queued"):  # alive, just slow
                    last_event_at = now
                    continue
                if event.WhichOneof("kind") == "token":
                    if tokens or prefill_done_at is not None:
                        self.p.token_gaps.observe(1, now - last_event_at)
                    tokens += 1
                last_event_at = now
                yield event
                if event.WhichOneof("kind") == "finished":
                    return
        finally:
            if read is not None:
                read.cancel()
            call.cancel()  # the decode instance frees the slot when its stream ends
            if not prefill.done():
                prefill.cancel()
            await asyncio.gather(prefill, return_exceptions=True)
            self.p.chooser.decode_finished(rid)

    def _event(self, read: asyncio.Future, decode_id: str) -> serving_pb2.DecodeEvent:
        rid = self.plan.request_id
        try:
            event = read.result()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in DECODE_MIGRATABLE:
                raise Migrate("failed", decode_id, exc.code(),
                              f"decode {decode_id}: {exc.code().name} {exc.details()}") from exc
            raise failed(exc, rid, f"decode {decode_id}") from exc
        if event is grpc.aio.EOF:
            raise Migrate("ended", decode_id, grpc.StatusCode.UNAVAILABLE,
                          f"decode {decode_id} ended the stream without finishing")
        return event

    async def _eligible(self, role: str):
        """Eligible instances of `role`; when none is but some are known (restarting, or
        suspected after a failure until they beat again), wait up to instance_wait_s."""
        p = self.p
        give_up = min(self.deadline, p.clock() + p.instance_wait_s)
        while True:
            eligible = p.view.eligible(role, p.clock())
            if eligible or not p.view.known(role) or p.clock() >= give_up:
                return eligible
            await asyncio.sleep(0.05)

    async def _open_decode(self):
        p = self.p
        last_error, last_code = "", None
        refused: set[str] = set()
        for tried in range(p.decode_attempts):
            plan, rid = self.plan, self.plan.request_id
            eligible = await self._eligible(DECODE)
            try:
                inst = p.chooser.choose_decode(eligible, len(plan.prompt_ids),
                                               plan.sampling.max_tokens, refused)
            except NoInstance as exc:
                # Every instance refused: pass on why (a request that does not fit stays
                # RESOURCE_EXHAUSTED); none serving at all is UNAVAILABLE.
                detail = f"{exc}; {p.view.describe(DECODE, p.clock())}"
                raise RequestFailed(last_code or grpc.StatusCode.UNAVAILABLE,
                                    f"{rid}: {detail}{last_error}") from exc
            # Recorded before the first await: concurrent requests must see each other's
            # choice, or they all pick the same instance between two heartbeats.
            p.chooser.decode_dispatched(inst.instance_id, rid, len(plan.prompt_ids),
                                        plan.sampling.max_tokens,
                                        inst.report.load.kv_block_size or None)
            stub = serving_pb2_grpc.DecodeStub(p.channels.get(inst.endpoint, DECODE))
            call = stub.Generate(serving_pb2.DecodeRequest(
                request_id=rid, prompt_ids=plan.prompt_ids, sampling=plan.sampling,
                step_offset=plan.step_offset), timeout=self._left())
            try:
                first = await self._accepted(call, inst.instance_id)
            except asyncio.CancelledError:  # the client left while we waited for the decision
                call.cancel()
                p.chooser.decode_finished(rid)
                raise
            except grpc.aio.AioRpcError as exc:
                call.cancel()
                p.chooser.decode_finished(rid)
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    # The instance still holds this id: a client retrying a request whose
                    # router died, before that router's call was cancelled. A fresh internal
                    # id ("#" is not allowed in client ids) does not collide.
                    self.plan = dataclasses.replace(plan, request_id=f"{plan.request_id}#d{tried}")
                    continue
                if exc.code() == grpc.StatusCode.UNAVAILABLE and \
                        not (exc.details() or "").startswith(rid):
                    # Not the instance refusing (its messages name the request): it could not
                    # be reached (dead, restarting). Skip it until it beats again, try again.
                    log.info("decode_unreachable", decode=inst.instance_id,
                             reason=exc.details())
                    p.view.suspect(inst.instance_id, p.clock())
                    last_error = f" (last error: {inst.instance_id}: {exc.details()})"
                    last_code = exc.code()
                    continue
                if exc.code() not in DECODE_REFUSALS:
                    raise failed(exc, rid, f"decode {inst.instance_id}") from exc
                metrics.DECODE_REFUSALS.inc()
                log.info("decode_refused", decode=inst.instance_id, code=exc.code().name,
                         reason=exc.details())
                refused.add(inst.instance_id)
                last_error = f" (last refusal: {inst.instance_id}: {exc.details()})"
                last_code = exc.code()
                continue
            if first is None:
                call.cancel()
                p.chooser.decode_finished(rid)
                refused.add(inst.instance_id)
                last_error = f" ({inst.instance_id} did not accept in time)"
                continue
            return call, inst
        raise RequestFailed(last_code or grpc.StatusCode.UNAVAILABLE,
                            f"{self.plan.request_id}: every decode instance tried refused the "
                            f"request{last_error}")

    async def _accepted(self, call, decode_id: str):
        """The `accepted` event (None when the instance stays silent or ends the stream);
        `queued` events in between prove it alive."""
        while True:
            try:
                event = await asyncio.wait_for(call.read(), min(self._left(),
                                                                self.p.token_gaps.deadline()))
            except TimeoutError:
                log.warning("decode_silent_before_accept", decode=decode_id)
                return None
            if event is grpc.aio.EOF:
                return None
            kind = event.WhichOneof("kind")
            if kind == "accepted":
                return event
            if kind != "queued":
                return None

    async def _prefill(self, decode_endpoint: str) -> serving_pb2.PrefillResult | None:
        p, plan, rid = self.p, self.plan, self.plan.request_id
        avoid: set[str] = set()
        cached = (p.prefix_view.cached_tokens(plan.prompt_ids, plan.tenant) if p.prefix_view
                  else None)
        for attempt in range(1 + p.prefill_retries):
            eligible = await self._eligible(PREFILL)
            try:
                inst = p.chooser.choose_prefill(eligible, len(plan.prompt_ids), avoid, cached)
            except NoInstance as exc:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                    f"{rid}: {exc}; {p.view.describe(PREFILL, p.clock())}"
                                    ) from exc
            self.outcome.prefill_instance = inst.instance_id
            p.chooser.prefill_dispatched(inst.instance_id, rid, len(plan.prompt_ids))
            stub = serving_pb2_grpc.PrefillStub(p.channels.get(inst.endpoint, PREFILL))
            t0 = p.clock()
            timeout = min(self._left(), p.prefills.deadline(len(plan.prompt_ids)))
            try:
                result = await stub.Prefill(serving_pb2.PrefillRequest(
                    request_id=rid, prompt_ids=plan.prompt_ids, sampling=plan.sampling,
                    decode_endpoint=decode_endpoint, step_offset=plan.step_offset,
                    tenant=plan.tenant),
                    timeout=timeout)
                p.prefills.observe(len(plan.prompt_ids), p.clock() - t0)
                if plan.step_offset == 0:  # the client's own prompt (not a migration's)
                    self.outcome.prompt_cache_hit_tokens = min(result.cached_tokens,
                                                               len(plan.prompt_ids))
                return result
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in PREFILL_RETRYABLE and attempt < p.prefill_retries
                log.warning("prefill_failed", prefill=inst.instance_id, code=exc.code().name,
                            reason=exc.details(), retry=retry)
                if not retry:
                    raise failed(exc, rid, f"prefill {inst.instance_id}") from exc
                metrics.PREFILL_RETRIES.inc()
                avoid.add(inst.instance_id)
                p.view.suspect(inst.instance_id, p.clock())
            finally:
                p.chooser.prefill_finished(rid)
        raise AssertionError("unreachable")


def failed(exc: grpc.aio.AioRpcError, rid: str, where: str) -> RequestFailed:
    """An instance's error, passed on with where it happened (the instance already named the
    request id in its message)."""
    code = exc.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        code = grpc.StatusCode.INTERNAL  # the router validated: an instance disagreeing is ours
    details = exc.details() or code.name
    if not details.startswith(rid):
        details = f"{rid}: {details}"
    return RequestFailed(code, f"{details} ({where})")
