"""gRPC shell of the router: the public `epserve.v1.Inference` API.

Generate: validate (INVALID_ARGUMENT; sizes on the event loop, tokenising on the encoder
pool's threads, RESOURCE_EXHAUSTED when too many prompts wait for it) -> admit
(RESOURCE_EXHAUSTED beyond the bound) -> the request flow (services/router/flow.py) -> one
usage record per admitted request that was served: finished, cancelled by the client, or
failed after tokens were streamed (one that failed before its first token served nothing, and
its client may retry it elsewhere).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from services.auth.api_keys import bearer
from services.auth.limiter import retry_after_header
from services.common.logging import bind_request
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import control_pb2, inference_pb2, inference_pb2_grpc
from services.router import metrics
from services.router.access import Access, Grant, Throttled
from services.router.admission import Admission, AtCapacity, Draining, DuplicateRequest
from services.router.encoder_pool import EncoderBusy, EncoderPool
from services.router.flow import Outcome, RequestFailed, RequestFlow
from services.router.usage import UsagePublisher
from services.router.validation import (
    ChatTurn,
    InvalidRequest,
    ModelLimits,
    RawRequest,
    ValidRequest,
    check_before_encoding,
    check_prompt_size,
    check_request_id,
    encode_prompt,
    validate,
)

log = structlog.get_logger("router")


def raw_request(request: inference_pb2.GenerateRequest, request_id: str) -> RawRequest:
    s = request.sampling
    return RawRequest(
        request_id=request_id, model=request.model, prompt=request.prompt,
        prompt_ids=tuple(request.prompt_ids),
        messages=tuple(ChatTurn(m.role, m.content) for m in request.messages),
        max_tokens=s.max_tokens, temperature=s.temperature,
        top_p=s.top_p if s.HasField("top_p") else None, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos, resume_token_ids=tuple(request.resume_token_ids),
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        logit_bias=tuple(s.logit_bias.items()),
        logprobs=s.logprobs if s.HasField("logprobs") else None, stop=tuple(s.stop))


class Gateway:
    """One request from admission to its usage record, for every front end (gRPC, HTTP).

    `generate` yields the public GenerateResponse messages; a request that is refused or fails
    raises RequestFailed carrying the gRPC status (front ends map it to their own codes).
    """

    def __init__(self, limits: ModelLimits, encoder: EncoderPool, admission: Admission,
                 flow: RequestFlow, usage: UsagePublisher, access: Access | None = None) -> None:
        self.limits, self.encoder = limits, encoder
        self.admission, self.flow, self.usage = admission, flow, usage
        self.access = access or Access(None)

    async def generate(self, raw: RawRequest, api_key: str | None = None
                       ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """The key is checked first (nothing is tokenised for a caller without one); the
        key's limits are held until the request ends, its tokens charged then."""
        rid = raw.request_id
        with bind_request(rid):
            grant = await self.access.admit(api_key, rid)
            used = [0]
            inner = self._generate(raw, grant, used)
            try:
                async for response in inner:
                    yield response
            finally:
                await inner.aclose()  # its own clean-up (admission, usage) runs now, not at GC
                self.access.done(grant, used[0])

    async def _generate(self, raw: RawRequest, grant: Grant, used: list[int]
                        ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        rid = raw.request_id
        try:
            check_before_encoding(raw, self.limits)  # nothing is queued for what cannot fit
            valid = await self.encoder.run(validate, raw, self.limits, self.encoder)
        except InvalidRequest as exc:
            metrics.REQUESTS.labels(outcome="invalid").inc()
            log.info("request_invalid", reason=str(exc))
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{rid}: {exc}") from exc
        except EncoderBusy as exc:
            metrics.REQUESTS.labels(outcome="resource_exhausted").inc()
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{rid}: {exc}") from exc
        reserved = len(valid.prompt_ids) + valid.sampling.max_tokens  # what decode reserves
        self.access.reserve(grant, reserved, rid)
        try:
            self.admission.admit(rid)
        except (AtCapacity, Draining, DuplicateRequest) as exc:
            self.access.unreserve(grant, reserved)
            code = {AtCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
                    Draining: grpc.StatusCode.UNAVAILABLE,
                    DuplicateRequest: grpc.StatusCode.ALREADY_EXISTS}[type(exc)]
            metrics.REQUESTS.labels(outcome=code.name.lower()).inc()
            raise RequestFailed(code, f"{rid}: {exc}") from exc
        metrics.IN_FLIGHT.set(self.admission.in_flight)
        metrics.PROMPT_TOKENS.inc(len(valid.prompt_ids))
        valid = dataclasses.replace(valid, tenant=grant.tenant)
        outcome = Outcome()
        error: RequestFailed | None = None
        t0 = time.monotonic()
        log.info("request_admitted", prompt_tokens=len(valid.prompt_ids),
                 max_tokens=valid.sampling.max_tokens)
        try:
            async for response in self.flow.run(valid, outcome):
                yield response
        except RequestFailed as exc:
            error = exc
        except Exception as exc:  # a bug: still a clear status with the request id
            log.exception("request_crashed")
            error = RequestFailed(grpc.StatusCode.INTERNAL, f"{rid}: internal error: {exc}")
        finally:
            # Runs on the client's cancellation too (the generator is closed).
            self.admission.release(rid)
            self.access.unreserve(grant, reserved)
            metrics.IN_FLIGHT.set(self.admission.in_flight)
            metrics.E2E.observe(time.monotonic() - t0)
            used[0] = len(valid.prompt_ids) + outcome.completion_tokens
            outcome_name = ("error" if error is not None else
                            "ok" if outcome.finish_reason != "abort" else "cancelled")
            metrics.REQUESTS.labels(outcome=outcome_name).inc()
            if error is None or outcome.completion_tokens:
                self.usage.publish_later(self._record(valid, outcome))
            # else: failed before its first token, nothing was served (the client may
            # retry it elsewhere, which bills it once): no usage record
            log.info("request_done", outcome=outcome_name, finish=outcome.finish_reason,
                     migrations=outcome.migrations,
                     completion_tokens=outcome.completion_tokens,
                     decode=outcome.decode_instance, prefill=outcome.prefill_instance)
        if error is not None:
            log.warning("request_failed", code=error.code, reason=error.message)
            raise error

    def _record(self, req: ValidRequest, outcome: Outcome) -> control_pb2.UsageRecord:
        return control_pb2.UsageRecord(
            usage_id=new_usage_id(), migrations=outcome.migrations,
            request_id=req.request_id, model=self.limits.name, started_at=outcome.started_at,
            finished_at=time.time(), prompt_tokens=len(req.prompt_ids),
            prompt_cache_hit_tokens=outcome.prompt_cache_hit_tokens,
            prompt_cache_miss_tokens=len(req.prompt_ids) - outcome.prompt_cache_hit_tokens,
            completion_tokens=outcome.completion_tokens, finish_reason=outcome.finish_reason,
            prefill_instance=outcome.prefill_instance, decode_instance=outcome.decode_instance,
            time_to_first_token_s=outcome.ttft_s, tenant=req.tenant)


# Trailing metadata of an error the router decided (a refusal, a failed request), as opposed to
# a router that went away mid-stream: a client resumes elsewhere only after the latter.
ROUTER_VERDICT = (("epserve-verdict", "router"),)
REQUEST_ID_KEY = "x-request-id"  # Tokenize's request id in the call's metadata


def grpc_api_key(context) -> str | None:
    """`authorization: Bearer <key>` in the call's metadata (as OpenAI's HTTP header)."""
    return bearer(dict(context.invocation_metadata() or ()).get("authorization"))


def verdict(exc: RequestFailed) -> tuple:
    """Trailing metadata of the router's own refusal; a throttled key also says when to retry."""
    if isinstance(exc, Throttled):
        return (*ROUTER_VERDICT, ("retry-after", retry_after_header(exc.retry_after_s)))
    return ROUTER_VERDICT


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:20]}"


def new_usage_id() -> str:
    """The server's own id of an accepted request: the usage record's JetStream message id,
    so two different requests that reuse a client id are both billed."""
    return f"usage-{uuid.uuid4().hex}"


class RouterServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway, model_cfg: ModelConfig) -> None:
        self.gateway, self.model_cfg = gateway, model_cfg
        self.limits, self.encoder = gateway.limits, gateway.encoder

    async def Generate(self, request, context):  # noqa: N802 (gRPC naming)
        raw = raw_request(request, request.request_id or new_request_id())
        try:
            async for response in self.gateway.generate(raw, grpc_api_key(context)):
                yield response
        except RequestFailed as exc:  # marked as the router's own verdict (see client.py)
            await context.abort(exc.status, exc.message, trailing_metadata=verdict(exc))

    async def Tokenize(self, request, context):  # noqa: N802
        """Bounded as Generate is: the size is checked first, the tokenising runs on the
        encoder pool; errors name the request id (metadata `x-request-id`, or a new one)."""
        rid = dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY) or new_request_id()
        await self._check_key(context, rid)
        raw = RawRequest(request_id=rid, model=request.model, prompt=request.text,
                         messages=tuple(ChatTurn(m.role, m.content) for m in request.messages))
        try:
            check_request_id(rid)
            if raw.model and raw.model != self.limits.name:
                raise InvalidRequest(f"unknown model {raw.model!r}; this router serves "
                                     f"{self.limits.name!r}")
            if bool(request.text) == bool(request.messages):
                raise InvalidRequest("give exactly one of text or messages")
            check_prompt_size(raw, self.limits)
            if request.text:
                ids = await self.encoder.run(self.encoder.encode, request.text, request.add_bos)
            else:
                ids = await self.encoder.run(encode_prompt, raw, self.encoder)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{rid}: {exc}")
        except EncoderBusy as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{rid}: {exc}")
        return inference_pb2.TokenizeResponse(token_ids=ids)

    async def _check_key(self, context, rid: str) -> None:
        try:
            await self.gateway.access.check(grpc_api_key(context), rid)
        except RequestFailed as exc:
            await context.abort(exc.status, exc.message, trailing_metadata=ROUTER_VERDICT)

    async def ListModels(self, request, context):  # noqa: N802
        await self._check_key(context, new_request_id())
        mc = self.model_cfg
        return inference_pb2.ListModelsResponse(models=[inference_pb2.ModelCard(
            id=self.limits.name, architecture=mc.model_type,
            context_length=self.limits.context_length, vocab_size=self.limits.vocab_size,
            routed_experts=mc.n_routed_experts, active_experts=mc.num_experts_per_tok)])
