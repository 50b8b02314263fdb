"""The gRPC client's failover between routers: a router that goes away (UNAVAILABLE, or
CANCELLED from a server stopping with the call in flight) sends the request to the next one,
resumed after the tokens already received; a router's own verdict is final. Two small gRPC
servers on loopback play the routers (the chaos suite does it with real ones)."""

from __future__ import annotations

import grpc
import pytest

from services.client import InferenceClient
from services.protos_gen.epserve.v1 import inference_pb2, inference_pb2_grpc
from services.router.server import ROUTER_VERDICT


class Router(inference_pb2_grpc.InferenceServicer):
    """Streams `tokens` after the request's resume_token_ids, or fails after `fail_after`
    tokens with `code` (and the router's verdict when `verdict`)."""

    def __init__(self, tokens, fail_after=None, code=grpc.StatusCode.CANCELLED, verdict=False):
        self.tokens, self.fail_after, self.code, self.verdict = tokens, fail_after, code, verdict
        self.requests = []

    async def Generate(self, request, context):  # noqa: N802
        self.requests.append(request)
        start = len(request.resume_token_ids)
        for i, t in enumerate(self.tokens[start:], start):
            if self.fail_after is not None and i - start == self.fail_after:
                await context.abort(self.code, "going away",
                                    trailing_metadata=ROUTER_VERDICT if self.verdict else ())
            yield inference_pb2.GenerateResponse(delta=inference_pb2.TokenDelta(
                index=i, token_ids=[t], text=f"<{t}>"))
        yield inference_pb2.GenerateResponse(final=inference_pb2.GenerateFinal(
            request_id=request.request_id, finish_reason="length", text=""))


async def serve(router: Router) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE])
@pytest.mark.parametrize("fail_after", [0, 2])
async def test_a_router_going_away_is_resumed_on_the_next(code, fail_after):
    tokens = [5, 6, 7, 8]
    first, second = Router(tokens, fail_after, code), Router(tokens)
    servers = [await serve(r) for r in (first, second)]
    try:
        async with InferenceClient(",".join(e for _, e in servers)) as client:
            out = await client.generate("r1", prompt_ids=[1, 2], timeout=10)
        assert out.token_ids == tokens and out.text == "<5><6><7><8>"
        assert list(second.requests[0].resume_token_ids) == tokens[:fail_after]
    finally:
        for server, _ in servers:
            await server.stop(0)


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT])
async def test_a_routers_own_verdict_is_final(code):
    first, second = Router([5, 6], 0, code, verdict=True), Router([5, 6])
    servers = [await serve(r) for r in (first, second)]
    try:
        async with InferenceClient(",".join(e for _, e in servers)) as client:
            with pytest.raises(grpc.aio.AioRpcError) as exc_info:
                await client.generate("r1", prompt_ids=[1, 2], timeout=10)
        assert exc_info.value.code() == code and not second.requests
    finally:
        for server, _ in servers:
            await server.stop(0)


class FinalThenGone(Router):
    """Sends the whole completion, then fails the call (a router killed after its last
    message, before the call's status)."""

    async def Generate(self, request, context):  # noqa: N802
        async for resp in super().Generate(request, context):
            yield resp
        await context.abort(grpc.StatusCode.UNAVAILABLE, "killed")


async def test_a_router_gone_after_the_final_message_is_not_asked_again():
    first, second = FinalThenGone([5, 6]), Router([5, 6])
    servers = [await serve(r) for r in (first, second)]
    try:
        async with InferenceClient(",".join(e for _, e in servers)) as client:
            out = await client.generate("r1", prompt_ids=[1, 2], timeout=10)
        assert out.token_ids == [5, 6] and out.finish_reason == "length"
        assert not second.requests, "a complete request was sent again"
    finally:
        for server, _ in servers:
            await server.stop(0)
