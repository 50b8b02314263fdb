"""Standard `grpc.health.v1` for our grpc.aio servers, and client-side checks.

A service reports NOT_SERVING from the moment the health servicer is added until it calls
`set_serving()` (after weights load and a warm-up), and NOT_SERVING again first thing in a drain.
Kubernetes probes and `ServiceProcess.wait_healthy` ask the overall service name "".
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import aio as health_aio

from services.common.mesh_tls import MeshTLS, role_target_options

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A check is a short-lived channel: reconnect quickly, and keep subchannels private so a
# failed attempt's backoff does not leak into the next check of the same target.
CHECK_CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
)


class ServiceHealth:
    """The health state of one grpc.aio server; build it with `add_health(server)`."""

    def __init__(self, servicer: health_aio.HealthServicer, names: tuple[str, ...]) -> None:
        self.servicer = servicer
        self._names = names
        # Another server's health that follows this one (the plaintext probe port, see
        # Service._start_health_port).
        self.mirror: ServiceHealth | None = None

    async def set_serving(self, name: str = OVERALL_HEALTH) -> None:
        await self.servicer.set(name, SERVING)
        if self.mirror is not None:
            await self.mirror.set_serving(name)

    async def set_not_serving(self, name: str | None = None) -> None:
        """NOT_SERVING for `name`, or for every known name when None."""
        for each in self._names if name is None else (name,):
            await self.servicer.set(each, NOT_SERVING)
        if self.mirror is not None:
            await self.mirror.set_not_serving(name)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every name, permanently: later `set_serving` calls are ignored."""
        await self.servicer.enter_graceful_shutdown()
        if self.mirror is not None:
            await self.mirror.enter_graceful_shutdown()


async def add_health(server: grpc.aio.Server, names: tuple[str, ...] = ()) -> ServiceHealth:
    """Adds a health servicer to `server`, with "" and every name in `names` NOT_SERVING.

    Call before `server.start()`. (The library servicer starts "" as SERVING; a service must
    not look ready before it is.)
    """
    servicer = health_aio.HealthServicer()
    all_names = (OVERALL_HEALTH, *[n for n in names if n != OVERALL_HEALTH])
    for name in all_names:
        await servicer.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return ServiceHealth(servicer, all_names)


def _check_channel(target: str, tls: MeshTLS | None, role: str | None, aio: bool):
    """A check's channel: plaintext, or mTLS with `tls` expecting a server of `role`."""
    module = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(target, options=CHECK_CHANNEL_OPTIONS)
    options = CHECK_CHANNEL_OPTIONS + (role_target_options(role) if role else ())
    return module.secure_channel(target, tls.channel_credentials(), options=options)


async def check_health(target: str, timeout: float, service: str = OVERALL_HEALTH,
                       tls: MeshTLS | None = None, role: str | None = None) -> bool:
    """True when `target` ("host:port") answers SERVING for `service` within `timeout` seconds.
    `tls`: check over mTLS with that identity (a mesh server), expecting a `role` server."""
    async with _check_channel(target, tls, role, aio=True) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError:
            return False
    return reply.status == SERVING


def check_health_sync(target: str, timeout: float, service: str = OVERALL_HEALTH,
                      tls: MeshTLS | None = None, role: str | None = None) -> bool:
    """Blocking form of `check_health`, for code outside an event loop."""
    with _check_channel(target, tls, role, aio=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError:
            return False
    return reply.status == SERVING
