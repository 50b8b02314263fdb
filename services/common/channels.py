"""gRPC options for every server and channel in the cluster, and one channel per peer endpoint.

One message limit everywhere: the largest message is a prefill's KV chunk or a dispatch of a
whole prefill batch's hidden states, both far below it; a limit that differs between a sender
and its receiver turns a large request into RESOURCE_EXHAUSTED on one side only.
"""

from __future__ import annotations

import grpc

from services.common import mesh_tls
from services.common.authz import RoleInterceptor

MAX_MESSAGE_BYTES = 512 << 20
GRPC_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
# A channel to a peer that died backs off before it reconnects, by default for up to two
# minutes: a peer restarted on its endpoint would look dead long after it is back.
CHANNEL_OPTIONS = GRPC_OPTIONS + (("grpc.initial_reconnect_backoff_ms", 100),
                                  ("grpc.min_reconnect_backoff_ms", 100),
                                  ("grpc.max_reconnect_backoff_ms", 1000))


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def dial(target: str, role: str | None = None,
         identity: mesh_tls.MeshTLS | None = None) -> grpc.aio.Channel:
    """A channel to a peer service: mTLS with `identity` (default: this process's installed
    one, services/common/mesh_tls.py), checking that the server's certificate is `role`'s
    when given; plaintext when there is no identity."""
    identity = identity or mesh_tls.current()
    if identity is None:
        return insecure_channel(target)
    options = CHANNEL_OPTIONS + (mesh_tls.role_target_options(role) if role else ())
    return grpc.aio.secure_channel(target, identity.channel_credentials(), options=options)


def new_server(max_receive_bytes: int | None = None, mesh: bool = False) -> grpc.aio.Server:
    """`max_receive_bytes`: a smaller limit on the requests this server takes (a service's
    public edge, where nothing legitimate is large); larger ones fail RESOURCE_EXHAUSTED.
    `mesh`: an internal server, every call checked against the role table (authz.py; bind
    it with mTLS so the peer has a certificate to check)."""
    interceptors = (RoleInterceptor(),) if mesh else ()
    if max_receive_bytes is None:
        return grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    if not 0 < max_receive_bytes <= MAX_MESSAGE_BYTES:
        raise ValueError(f"max_receive_bytes must be in (0, {MAX_MESSAGE_BYTES}], "
                         f"got {max_receive_bytes}")
    return grpc.aio.server(options=(("grpc.max_receive_message_length", max_receive_bytes),
                                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)),
                           interceptors=interceptors)


class Channels:
    """Channels reused across requests (a router dialling instances, a prefill instance
    dialling decode instances), over mTLS when this process has an identity (`dial`).
    `role`: the role every server dialled must have (or pass it to `get`)."""

    def __init__(self, role: str | None = None) -> None:
        self.role = role
        self._channels: dict[tuple[str, str | None], grpc.aio.Channel] = {}

    def get(self, endpoint: str, role: str | None = None) -> grpc.aio.Channel:
        key = (endpoint, role or self.role)
        if key not in self._channels:
            self._channels[key] = dial(endpoint, key[1])
        return self._channels[key]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
