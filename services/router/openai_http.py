"""OpenAI-compatible HTTP front end of the router (`--http-port`): what vLLM and SGLang users
point their clients at, shaped as OpenAI's published OpenAPI document says (tests validate
every body against it: tests/integration/test_openai_conformance.py).

    GET  /v1/models, /v1/models/{model}
    POST /v1/completions        prompt: string | [token ids] | a batch of either; stream: bool
    POST /v1/chat/completions   messages: [{role, content}]; stream: bool
    GET  /health

It shares the gRPC front end's Gateway (validation, admission, flow, usage records), so both
APIs behave the same. Errors are OpenAI's ErrorResponse `{"error": {"message", "type", "param",
"code"}}` (`param` names the parameter at fault, null when none) with HTTP 400 (invalid), 404
(unknown model or route), 413 (body over --max-request-bytes, refused unread), 429 (at
capacity), 503 (draining / no instance), 500/502/504 otherwise. Streaming is server-sent events
ending with `data: [DONE]`; with `stream_options.include_usage` the usage comes in a last chunk
of its own with empty `choices` (chat chunks before it carry `"usage": null`; completion chunks
leave it out, the document having no null usage there). Which parameters are served, accepted
at their defaults only, or refused: services/router/openai_params.py; `n` choices of each
prompt (index prompt * n + choice): openai_choices.py; the `logprobs` objects:
openai_logprobs.py.
"""

from __future__ import annotations

import json
import time

import grpc
import structlog
from aiohttp import web

from services.auth.api_keys import bearer
from services.auth.limiter import retry_after_header
from services.protos_gen.epserve.v1 import inference_pb2
from services.router import metrics
from services.router.access import Throttled
from services.router.flow import RequestFailed
from services.router.openai_choices import Choices
from services.router.openai_choices import usage as choices_usage
from services.router.openai_logprobs import ChoiceLogprobs
from services.router.openai_params import BadRequest, OpenAIRequest, parse_body
from services.router.server import Gateway, new_request_id
from services.router.validation import InvalidRequest, check_before_encoding

log = structlog.get_logger("router")
STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.ALREADY_EXISTS: 409,
          grpc.StatusCode.UNAUTHENTICATED: 401,
          grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
          grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.DATA_LOSS: 502}


def error_object(status: int, message: str, code: str | None, param: str | None = None
                 ) -> dict:
    kind = ("rate_limit_error" if status == 429 else "server_error" if status >= 500 else
            "invalid_request_error")
    return {"message": message, "type": kind, "param": param, "code": code}


def _error(status: int, message: str, code: str | None, param: str | None = None,
           rid: str = "") -> web.Response:
    return web.json_response({"error": error_object(status, message, code, param)},
                             status=status, headers={"X-Request-Id": rid} if rid else None)


def api_key(request: web.Request) -> str | None:
    return bearer(request.headers.get("Authorization"))


def usage_object(usage: inference_pb2.Usage) -> dict:
    """OpenAI's CompletionUsage from the gRPC Usage: the one place the HTTP usage is built.
    The prefix-cache hits twice: OpenAI's `prompt_tokens_details.cached_tokens` and DeepSeek's
    own `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` (which add up to prompt_tokens)."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.prompt_cache_hit_tokens},
            "prompt_cache_hit_tokens": usage.prompt_cache_hit_tokens,
            "prompt_cache_miss_tokens": usage.prompt_cache_miss_tokens}


def _failure(exc: RequestFailed, req: OpenAIRequest | None, rid: str = "") -> web.Response:
    """A refusal or failure of the Gateway; a validation refusal names the body's parameter,
    a key over its limit says when to retry."""
    rid = req.raw.request_id if req is not None else rid
    if exc.status == grpc.StatusCode.UNAUTHENTICATED:
        return _error(401, exc.message, "invalid_api_key", None, rid)
    if isinstance(exc, Throttled):
        response = _error(429, exc.message, "rate_limit_exceeded", None, rid)
        response.headers["Retry-After"] = retry_after_header(exc.retry_after_s)
        return response
    cause = exc.__cause__
    param = req.params.get(cause.param) if isinstance(cause, InvalidRequest) else None
    if param == "model":
        return _error(404, exc.message, "model_not_found", param, req.raw.request_id)
    return _error(STATUS.get(exc.status, 500), exc.message, exc.code.lower(), param,
                  req.raw.request_id)


@web.middleware
async def _errors_as_openai(request: web.Request, handler):
    """aiohttp's own refusals (no route, wrong method, body too large) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, f"{request.method} {request.path}: {exc.reason}",
                      exc.reason.lower().replace(" ", "_"))


class OpenAIHttp:
    def __init__(self, gateway: Gateway, model_cfg, max_request_bytes: int) -> None:
        self.gateway, self.model_cfg = gateway, model_cfg
        self.max_request_bytes = max_request_bytes
        self.app = web.Application(client_max_size=max_request_bytes,
                                   middlewares=[_errors_as_openai])
        self.app.add_routes([web.get("/v1/models", self.models),
                             web.get("/v1/models/{model}", self.model),
                             web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.get("/health", self.health)])
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        if self.gateway.admission.draining:
            return _error(503, "draining", "unavailable")
        return web.json_response({"status": "ok"})

    def _model_object(self) -> dict:
        limits = self.gateway.limits
        return {"id": limits.name, "object": "model", "created": 0, "owned_by": "epserve",
                "max_model_len": limits.context_length}

    async def _key_refused(self, request: web.Request) -> web.Response | None:
        """With API keys on, the error response for a request without a valid key."""
        rid = request.headers.get("X-Request-Id") or new_request_id()
        try:
            await self.gateway.access.check(api_key(request), rid)
        except RequestFailed as exc:
            return _failure(exc, None, rid)
        return None

    async def models(self, request: web.Request) -> web.Response:
        if refused := await self._key_refused(request):
            return refused
        return web.json_response({"object": "list", "data": [self._model_object()]})

    async def model(self, request: web.Request) -> web.Response:
        if refused := await self._key_refused(request):
            return refused
        name = request.match_info["model"]
        if name != self.gateway.limits.name:
            return _error(404, f"the model {name!r} does not exist; this router serves "
                               f"{self.gateway.limits.name!r}", "model_not_found", "model")
        return web.json_response(self._model_object())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _read(self, request: web.Request, rid: str):
        """The body as JSON, or the error response; a body over the limit is refused unread."""
        too_large = _error(413, f"{rid}: the body is larger than this router's limit of "
                                f"{self.max_request_bytes} bytes (--max-request-bytes)",
                           "request_too_large", None, rid)
        if (request.content_length or 0) > self.max_request_bytes:
            return None, too_large
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:  # chunked, no Content-Length to refuse it by
            return None, too_large
        try:
            return json.loads(data), None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, _error(400, f"{rid}: the body is not valid JSON", "invalid_json",
                                None, rid)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or new_request_id()
        if self.gateway.access.enabled and (refused := await self._key_refused(request)):
            return refused  # before the body is read: nothing is parsed for a caller without a key
        body, refusal = await self._read(request, rid)
        if refusal is not None:
            return refusal
        try:
            req = parse_body(body, chat, rid)
        except BadRequest as exc:
            return _error(400, f"{rid}: {exc}", "invalid_request", exc.param, rid)
        if req.user:
            log.info("openai_request_user", request_id=rid, user=req.user[:128])
        if refused := self._bad_prompt_of_a_batch(req):
            return refused
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        key = api_key(request)
        choices = Choices.start(req.prompts, req.n, lambda raw: self.gateway.generate(raw, key))
        try:
            try:
                await choices.first()  # refusals surface here, before any byte
            except RequestFailed as exc:
                return _failure(exc, req)
            if req.stream:
                return await self._stream(request, req, created, chat, choices)
            return await self._whole(req, kind, created, chat, choices)
        finally:
            # A client that goes away cancels this handler: closing the choices here runs
            # each request's cleanup at once (the decode slot is freed, the usage written).
            await choices.close()

    def _bad_prompt_of_a_batch(self, req: OpenAIRequest) -> web.Response | None:
        """A batch's prompts are all checked before any starts, with the checks that need no
        tokenising (the Gateway runs them again for each): one prompt at fault refuses the
        request before its siblings are admitted, prefilled and billed for nothing."""
        if len(req.prompts) == 1:
            return None  # the Gateway's own checks refuse it, as they always have
        for p, raw in enumerate(req.prompts):
            try:
                check_before_encoding(raw, self.gateway.limits)
            except InvalidRequest as exc:
                metrics.REQUESTS.labels(outcome="invalid").inc()
                which = f"prompt[{p}]: " if exc.param in ("prompt", "prompt_ids") else ""
                failed = RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"{raw.request_id}: {which}{exc}")
                failed.__cause__ = exc  # names the parameter, as the Gateway's refusals do
                return _failure(failed, req)
        return None

    def _logprobs(self, chat: bool) -> ChoiceLogprobs:
        return ChoiceLogprobs(chat, self.gateway.flow.tokenizer.token_bytes)

    @staticmethod
    def _choice(chat: bool, index: int, text: str, finish: str | None, delta: dict | None,
                logprobs: dict | None) -> dict:
        """One choice; `delta` is None for a whole response, else the chunk's delta fields
        besides the content (the first chat chunk names the role)."""
        if chat and delta is None:
            return {"index": index, "message": {"role": "assistant", "content": text,
                                                "refusal": None},
                    "finish_reason": finish, "logprobs": logprobs}
        if chat:
            return {"index": index, "delta": {**delta, "content": text},
                    "finish_reason": finish, "logprobs": logprobs}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

    async def _whole(self, req, kind, created, chat, choices: Choices) -> web.Response:
        pieces = [[] for _ in range(choices.count)]
        finals: list = [None] * choices.count
        logprobs = [self._logprobs(chat) for _ in range(choices.count)]
        try:
            async for i, resp in choices.events():
                if resp.WhichOneof("kind") == "delta":
                    pieces[i].append(resp.delta.text)
                    logprobs[i].add(resp.delta)
                else:
                    finals[i] = resp.final
                    pieces[i].append(resp.final.text)
        except RequestFailed as exc:
            return _failure(exc, req)
        rid = req.raw.request_id
        if any(f is None for f in finals):
            return _error(500, f"{rid}: a choice ended without its final message", "internal",
                          None, rid)
        asked = req.raw.logprobs is not None
        return web.json_response({
            "id": rid, "object": kind, "created": created, "model": self.gateway.limits.name,
            "choices": [self._choice(chat, i, "".join(pieces[i]), finals[i].finish_reason,
                                     None, logprobs[i].whole(asked))
                        for i in range(choices.count)],
            "usage": usage_object(choices_usage(finals, req.n))}, headers={"X-Request-Id": rid})

    async def _stream(self, request, req: OpenAIRequest, created, chat, choices: Choices
                      ) -> web.StreamResponse:
        rid = req.raw.request_id
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache", "X-Request-Id": rid})
        await out.prepare(request)

        async def send(payload: dict) -> None:
            await out.write(f"data: {json.dumps(payload)}\n\n".encode())

        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.gateway.limits.name}
        if chat and req.include_usage:
            base["usage"] = None  # as OpenAI: null on every chunk but the usage chunk
        # the first chat chunk of each choice names the role
        deltas: list[dict] = [{"role": "assistant"} for _ in range(choices.count)]
        logprobs = [self._logprobs(chat) for _ in range(choices.count)]
        finals: list = [None] * choices.count  # in choice-index order, for the usage
        try:
            async for i, resp in choices.events():
                if resp.WhichOneof("kind") == "delta":
                    await send({**base, "choices": [self._choice(
                        chat, i, resp.delta.text, None, deltas[i], logprobs[i].of(resp.delta))]})
                else:
                    finals[i] = resp.final
                    await send({**base, "choices": [self._choice(
                        chat, i, resp.final.text, resp.final.finish_reason, deltas[i], None)]})
                deltas[i] = {}
            if req.include_usage:  # after every choice's last chunk
                if any(f is None for f in finals):
                    raise RequestFailed(grpc.StatusCode.INTERNAL,
                                        f"{rid}: a choice ended without its final message")
                await send({**base, "choices": [],
                            "usage": usage_object(choices_usage(finals, req.n))})
        except RequestFailed as exc:  # headers are sent: the error travels as an event
            await send({"error": error_object(500, exc.message, exc.code.lower())})
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out
