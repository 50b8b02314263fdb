"""Who may call what inside the mesh: the role table (pure) and the server interceptor.

Every internal gRPC server (all but the router's public API) runs with mTLS: the handshake
already refuses a peer without a CA-signed certificate. This decides, per RPC, whether the
peer's role (from its certificate, services/common/certs.py `role_of`) may make the call:

- only prefill pushes KV into decode (`Decode/TransferKV`): anyone else could put KV and a
  first token into another user's request;
- only the router opens `Decode/Generate` and `Prefill/Prefill` (prompts come from the
  router, which checks API keys; `Prefill` names the decode instance to dial);
- only attention instances (prefill, decode) dispatch to expert workers; the scheduler and
  the operator may read a worker's `Info` and `Load`;
- health and reflection: any CA-signed peer.
A method not in the table is refused: a new RPC is closed until someone decides who calls it.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog

from services.common.certs import role_of

log = structlog.get_logger("authz")

ANY_PEER = "*"  # any CA-signed peer with an epserve role
ATTENTION = ("prefill", "decode")

# Full method name, or a service prefix ending in "/", -> roles allowed.
ROLE_TABLE: dict[str, tuple[str, ...]] = {
    "/epserve.v1.Decode/TransferKV": ("prefill",),
    "/epserve.v1.Decode/Generate": ("router",),
    "/epserve.v1.Prefill/Prefill": ("router",),
    "/epserve.v1.ExpertWorker/Dispatch": ATTENTION,
    "/epserve.v1.ExpertWorker/DispatchOnce": ATTENTION,
    "/epserve.v1.ExpertWorker/Info": (*ATTENTION, "scheduler", "operator"),
    "/epserve.v1.ExpertWorker/Load": (*ATTENTION, "scheduler", "operator"),
    "/grpc.health.v1.Health/": (ANY_PEER,),
    "/grpc.reflection.v1alpha.ServerReflection/": (ANY_PEER,),
    "/grpc.reflection.v1.ServerReflection/": (ANY_PEER,),
}


@dataclass(frozen=True)
class Denied:
    code: grpc.StatusCode
    message: str


def allowed_roles(method: str, table: dict[str, tuple[str, ...]] = ROLE_TABLE
                  ) -> tuple[str, ...] | None:
    """The roles that may call `method` ("/pkg.Service/Method"); None when it is not listed."""
    if method in table:
        return table[method]
    service = method[:method.rfind("/") + 1]
    return table.get(service) if service else None


def authorize(method: str, role: str | None, instance: str = "",
              table: dict[str, tuple[str, ...]] = ROLE_TABLE) -> Denied | None:
    """None when a peer of `role` may call `method`; otherwise why not, as a status."""
    if role is None:
        return Denied(grpc.StatusCode.UNAUTHENTICATED,
                      f"{method} needs a client certificate naming an epserve role "
                      f"(spiffe://epserve/<role>/<instance>)")
    roles = allowed_roles(method, table)
    if roles is None:
        return Denied(grpc.StatusCode.PERMISSION_DENIED,
                      f"{method} is not in the role table: no role may call it")
    if ANY_PEER in roles or role in roles:
        return None
    peer = f"{role} ({instance})" if instance else role
    return Denied(grpc.StatusCode.PERMISSION_DENIED,
                  f"{method} may be called only by {' or '.join(roles)}; the peer is {peer}")


class _PeerRoles:
    """Certificate -> (role, instance), parsed once per distinct certificate."""

    def __init__(self, size: int = 256) -> None:
        self._cache: OrderedDict[bytes, tuple[str, str] | None] = OrderedDict()
        self._size = size

    def of(self, context) -> tuple[str, str] | None:
        certs = context.auth_context().get("x509_pem_cert") or []
        if not certs:
            return None
        pem = certs[0]
        if pem not in self._cache:
            try:
                self._cache[pem] = role_of(pem)
            except ValueError:
                self._cache[pem] = None
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return self._cache[pem]


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call against the role table before the handler runs.

    A grpc.aio interceptor sees only the method name, not the peer, so it wraps the handler:
    the wrapper reads the peer's certificate from `context.auth_context()` and aborts with the
    table's verdict before calling the real behaviour.
    """

    def __init__(self, table: dict[str, tuple[str, ...]] = ROLE_TABLE) -> None:
        self.table = table
        self.peers = _PeerRoles()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        async def check(context) -> None:
            who = self.peers.of(context)
            denied = authorize(method, *(who or (None,)), table=self.table)
            if denied is not None:
                log.warning("rpc_refused", method=method, code=denied.code.name,
                            peer=context.peer(), role=who[0] if who else None)
                await context.abort(denied.code, denied.message)

        return _guarded(handler, check)


def _wrap(behaviour: Callable, check) -> Callable:
    if inspect.isasyncgenfunction(behaviour):
        async def stream(request, context):
            await check(context)
            async for item in behaviour(request, context):
                yield item
        return stream

    async def unary(request, context):
        await check(context)
        return await behaviour(request, context)
    return unary


def _guarded(handler: grpc.RpcMethodHandler, check) -> grpc.RpcMethodHandler:
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attr, make in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(_wrap(behaviour, check),
                        request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
