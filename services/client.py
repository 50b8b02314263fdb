"""A gRPC client of the router's public API (`epserve.v1.Inference`), used by the CLI, the demo,
the tests and the benchmarks. Streams are assembled into one `RemoteCompletion` per request.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

import grpc

from services.common.channels import CHANNEL_OPTIONS
from services.engine.sampling import SamplingParams, TokenLogprobs
from services.engine.sampling_proto import logprobs_from_proto, params_to_proto
from services.protos_gen.epserve.v1 import inference_pb2, inference_pb2_grpc


@dataclass
class RemoteCompletion:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    ttft_s: float = 0.0  # measured by this client
    total_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds since the request began
    server_usage: inference_pb2.Usage | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # when params.logprobs is set

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        if len(self.token_times) < 2:
            return 0.0
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


# A request that fails with these is sent to the next router: the router went away (died,
# draining, unreachable, or stopping: a server that stops cancels the calls it still holds,
# and a CANCELLED status is never this client's own doing, whose cancellation is asyncio's
# CancelledError). Before the first token it is sent again as it was; mid-stream it is
# resumed: the next router continues after the tokens already received (resume_token_ids).
RETRY_ON_ANOTHER_ROUTER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _router_verdict(exc: grpc.aio.AioRpcError) -> bool:
    """The router itself ended the request (services/router/server.py ROUTER_VERDICT)."""
    return ("epserve-verdict", "router") in tuple(exc.trailing_metadata() or ())


def unique_prefix(kind: str) -> str:
    """A request-id prefix no other client process or run shares (random, 48 bits)."""
    return f"{kind}-{uuid.uuid4().hex[:12]}"


class InferenceClient:
    """`endpoint`: one router's host:port, or several separated by commas. A request whose
    router fails with UNAVAILABLE (or CANCELLED, a router stopping) is retried, or resumed mid-stream, on the next router, each
    router at most once per request; the completion is one stream either way (greedy and
    seeded output as one router would give it; a request sampled without a seed is resumed
    with a fresh one).

    A request given no id gets `<id_prefix>-<n>`: unique to this client (the prefix is random
    unless given), and the same on every router it is sent to."""

    def __init__(self, endpoint: str, id_prefix: str = "", api_key: str = "") -> None:
        self.endpoints = [e.strip() for e in endpoint.split(",") if e.strip()]
        if not self.endpoints:
            raise ValueError("no router endpoint given")
        self.endpoint = self.endpoints[0]
        self.channels = [grpc.aio.insecure_channel(e, options=CHANNEL_OPTIONS)
                         for e in self.endpoints]
        self.stubs = [inference_pb2_grpc.InferenceStub(c) for c in self.channels]
        self.channel, self.stub = self.channels[0], self.stubs[0]
        self._next = 0  # requests start on the routers in turn
        self.id_prefix = id_prefix or unique_prefix("client")
        self._ids = itertools.count()
        # A router started with --api-keys wants `authorization: Bearer <key>` on every call.
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    def stream(self, request: inference_pb2.GenerateRequest, timeout: float | None = None,
               router: int = 0):
        """The raw response stream of one router (a call object: iterate it, or `cancel()`)."""
        return self.stubs[router % len(self.stubs)].Generate(request, timeout=timeout,
                                                             metadata=self.metadata)

    async def generate(self, request_id: str = "", *, prompt: str = "",
                       prompt_ids: list[int] | None = None,
                       messages: list[tuple[str, str]] | None = None,
                       params: SamplingParams | None = None, model: str = "",
                       timeout: float | None = 300.0) -> RemoteCompletion:
        """One request to completion. A gRPC error propagates as grpc.aio.AioRpcError."""
        request_id = request_id or self.new_request_id()
        req = inference_pb2.GenerateRequest(
            request_id=request_id, model=model, prompt=prompt, prompt_ids=prompt_ids or [],
            messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages or ()],
            sampling=params_to_proto(params or SamplingParams()))
        first = self._next
        self._next += 1
        out, pieces, t0 = RemoteCompletion(request_id), [], time.perf_counter()
        for tried in range(len(self.stubs)):
            try:
                return await self._generate_on(first + tried, req, timeout, out, pieces, t0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY_ON_ANOTHER_ROUTER or tried == len(self.stubs) - 1:
                    raise
                if _router_verdict(exc) and (out.token_ids or
                                             exc.code() != grpc.StatusCode.UNAVAILABLE):
                    raise  # the router failed it on purpose (it billed what it streamed)
                del req.resume_token_ids[:]
                req.resume_token_ids.extend(out.token_ids)
        raise AssertionError("unreachable")

    def new_request_id(self) -> str:
        return f"{self.id_prefix}-{next(self._ids)}"

    async def _generate_on(self, router: int, req, timeout, out: RemoteCompletion,
                           pieces: list[str], t0: float) -> RemoteCompletion:
        finished = False
        try:
            async for resp in self.stream(req, timeout, router):
                now = time.perf_counter() - t0
                if resp.WhichOneof("kind") == "delta":
                    self._add_delta(out, pieces, resp.delta, now)
                else:
                    final = resp.final
                    out.request_id = final.request_id
                    out.finish_reason = final.finish_reason
                    out.prompt_tokens = final.usage.prompt_tokens
                    out.server_usage = final.usage
                    pieces.append(final.text)
                    finished = True
        except grpc.aio.AioRpcError:
            if not finished:
                raise
            # the router went away after the final message, before the call's status: the
            # request is complete (a retry would answer it twice)
        out.text = "".join(pieces)
        out.total_s = time.perf_counter() - t0
        return out

    @staticmethod
    def _add_delta(out: RemoteCompletion, pieces: list[str], delta, now: float) -> None:
        if delta.index != len(out.token_ids):  # a router broke the stream contract
            raise RuntimeError(f"{out.request_id}: token index {delta.index} "
                               f"arrived, expected {len(out.token_ids)}")
        if not out.token_ids:
            out.ttft_s = now
        out.token_ids.extend(delta.token_ids)
        out.logprobs.extend(logprobs_from_proto(t, lp) for t, lp in zip(
            delta.token_ids, delta.logprobs, strict=False))
        out.token_times.extend([now] * len(delta.token_ids))
        pieces.append(delta.text)

    async def tokenize(self, text: str = "", add_bos: bool = True) -> list[int]:
        resp = await self.stub.Tokenize(inference_pb2.TokenizeRequest(text=text, add_bos=add_bos),
                                        metadata=self.metadata)
        return list(resp.token_ids)

    async def list_models(self) -> list[inference_pb2.ModelCard]:
        return list((await self.stub.ListModels(inference_pb2.ListModelsRequest(),
                                                metadata=self.metadata)).models)
