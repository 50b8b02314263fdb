"""OpenAI-compatible HTTP front end of the router (`--http-port`): what vLLM and SGLang users
point their clients at.

    GET  /v1/models
    POST /v1/completions        prompt: string | [token ids]; stream: bool
    POST /v1/chat/completions   messages: [{role, content}]; stream: bool
    GET  /health

It shares the gRPC front end's Gateway (validation, admission, flow, usage records), so both
APIs behave the same. Errors are JSON `{"error": {"message", "type", "code"}}` with HTTP 400
(invalid), 429 (at capacity), 503 (draining / no instance), 500/502/504 otherwise. Streaming is
server-sent events ending with `data: [DONE]`. Supported fields: max_tokens (default 16),
temperature, top_p, seed, stop_token_ids and the extensions top_k and ignore_eos; `n` must be 1;
`stop` strings, logprobs and tools are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import time

import grpc
from aiohttp import web

from services.router.flow import RequestFailed
from services.router.server import Gateway, new_request_id
from services.router.validation import ChatTurn, RawRequest

STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.ALREADY_EXISTS: 409,
          grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
          grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.DATA_LOSS: 502}
UNSUPPORTED = ("stop", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
               "suffix", "echo", "best_of", "logit_bias")


class BadRequest(ValueError):
    pass


def _error(status: int, message: str, code: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 and status != 429 else (
        "rate_limit_error" if status == 429 else "server_error")
    return web.json_response({"error": {"message": message, "type": kind, "code": code}},
                             status=status)


def _number(body: dict, key: str, kind, default=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"{key} must be a{'n integer' if kind is int else ' number'}, "
                         f"got {value!r}")
    return kind(value)


def raw_from_body(body: object, chat: bool, request_id: str) -> RawRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, [], False):
            raise BadRequest(f"{key!r} is not supported by epserve")
    if _number(body, "n", int, 1) != 1:
        raise BadRequest("n must be 1")
    prompt, prompt_ids, messages = "", (), ()
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise BadRequest("messages must be a list of {role, content} objects with string "
                             "content")
        messages = tuple(ChatTurn(m["role"], m["content"]) for m in msgs)
    else:
        p = body.get("prompt")
        if isinstance(p, str):
            prompt = p
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
            prompt_ids = tuple(p)
        else:
            raise BadRequest("prompt must be a string or a list of token ids")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise BadRequest("stop_token_ids must be a list of integers")
    seed = _number(body, "seed", int)
    return RawRequest(
        request_id=request_id, model=str(body.get("model") or ""), prompt=prompt,
        prompt_ids=prompt_ids, messages=messages,
        max_tokens=_number(body, "max_completion_tokens", int) or _number(body, "max_tokens", int,
                                                                          16),
        temperature=_number(body, "temperature", float, 1.0),
        top_p=_number(body, "top_p", float), top_k=_number(body, "top_k", int, 0), seed=seed,
        stop_token_ids=tuple(stop_ids), ignore_eos=bool(body.get("ignore_eos", False)))


class OpenAIHttp:
    def __init__(self, gateway: Gateway, model_cfg) -> None:
        self.gateway, self.model_cfg = gateway, model_cfg
        self.app = web.Application(client_max_size=16 << 20)
        self.app.add_routes([web.get("/v1/models", self.models),
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

    async def models(self, request: web.Request) -> web.Response:
        limits = self.gateway.limits
        return web.json_response({"object": "list", "data": [{
            "id": limits.name, "object": "model", "created": 0, "owned_by": "epserve",
            "max_model_len": limits.context_length}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or new_request_id()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, f"{rid}: the body is not valid JSON", "invalid_json")
        try:
            raw = raw_from_body(body, chat, rid)
        except BadRequest as exc:
            return _error(400, f"{rid}: {exc}", "invalid_request")
        stream = bool(body.get("stream", False))
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        responses = self.gateway.generate(raw)
        try:
            try:
                first = await anext(responses)  # refusals surface here, before any byte
            except RequestFailed as exc:
                return _error(STATUS.get(exc.status, 500), exc.message, exc.code.lower())
            except StopAsyncIteration:
                return _error(500, f"{rid}: empty response", "internal")
            if stream:
                return await self._stream(request, rid, kind, created, chat, first, responses)
            return await self._whole(rid, kind, created, chat, first, responses)
        finally:
            # A client that goes away cancels this handler: closing the stream here runs the
            # request's cleanup at once (the decode slot is freed, the usage record written).
            await responses.aclose()

    def _choice(self, chat: bool, text: str, finish: str | None, delta: bool) -> dict:
        if chat:
            key = "delta" if delta else "message"
            content = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, key: content, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    async def _whole(self, rid, kind, created, chat, first, responses) -> web.Response:
        pieces, final = [], None
        try:
            async for resp in _chain(first, responses):
                if resp.WhichOneof("kind") == "delta":
                    pieces.append(resp.delta.text)
                else:
                    final = resp.final
                    pieces.append(final.text)
        except RequestFailed as exc:
            return _error(STATUS.get(exc.status, 500), exc.message, exc.code.lower())
        usage = final.usage
        return web.json_response({
            "id": rid, "object": kind, "created": created, "model": self.gateway.limits.name,
            "choices": [self._choice(chat, "".join(pieces), final.finish_reason, False)],
            "usage": {"prompt_tokens": usage.prompt_tokens,
                      "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.prompt_tokens + usage.completion_tokens}})

    async def _stream(self, request, rid, kind, created, chat, first, responses
                      ) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache", "X-Request-Id": rid})
        await out.prepare(request)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict) -> None:
            await out.write(f"data: {json.dumps(payload)}\n\n".encode())

        base = {"id": rid, "object": chunk_kind, "created": created,
                "model": self.gateway.limits.name}
        try:
            async for resp in _chain(first, responses):
                if resp.WhichOneof("kind") == "delta":
                    await send({**base, "choices": [self._choice(chat, resp.delta.text, None,
                                                                 True)]})
                else:
                    u = resp.final.usage
                    await send({**base, "choices": [self._choice(
                        chat, resp.final.text, resp.final.finish_reason, True)],
                        "usage": {"prompt_tokens": u.prompt_tokens,
                                  "completion_tokens": u.completion_tokens,
                                  "total_tokens": u.prompt_tokens + u.completion_tokens}})
        except RequestFailed as exc:  # headers are sent: the error travels as an event
            await send({"error": {"message": exc.message, "type": "server_error",
                                  "code": exc.code.lower()}})
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item
