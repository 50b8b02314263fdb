"""Health servicer helpers on an in-process grpc.aio server."""

from __future__ import annotations

import asyncio

import grpc

from services.common.health import add_health, check_health, check_health_sync
from services.local.ports import free_port


async def test_not_serving_until_set_then_serving_then_graceful_shutdown():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    health = await add_health(server, names=("epserve.v1.Expert",))
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        assert await check_health(target, 2.0) is False
        await health.set_serving()
        assert await check_health(target, 2.0) is True
        assert await check_health(target, 2.0, service="epserve.v1.Expert") is False
        await health.set_serving("epserve.v1.Expert")
        assert await check_health(target, 2.0, service="epserve.v1.Expert") is True
        assert await check_health(target, 2.0, service="unknown.Service") is False
        # the blocking client (used by ServiceProcess.wait_healthy) agrees
        assert await asyncio.to_thread(check_health_sync, target, 2.0) is True

        await health.enter_graceful_shutdown()
        await health.set_serving()  # ignored once shutting down
        assert await check_health(target, 2.0) is False
        assert await check_health(target, 2.0, service="epserve.v1.Expert") is False
    finally:
        await server.stop(None)


async def test_check_against_nothing_listening_is_false_within_timeout():
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await check_health(f"127.0.0.1:{free_port()}", 0.3) is False
    assert loop.time() - started < 2.0
