"""gRPC options for every server and channel in the cluster, and one channel per peer endpoint.

One message limit everywhere: the largest message is a prefill's KV chunk or a dispatch of a
whole prefill batch's hidden states, both far below it; a limit that differs between a sender
and its receiver turns a large request into RESOURCE_EXHAUSTED on one side only.
"""

from __future__ import annotations

import grpc

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


def new_server(max_receive_bytes: int | None = None) -> grpc.aio.Server:
    """`max_receive_bytes`: a smaller limit on the requests this server takes (a service's
    public edge, where nothing legitimate is large); larger ones fail RESOURCE_EXHAUSTED."""
    if max_receive_bytes is None:
        return grpc.aio.server(options=GRPC_OPTIONS)
    if not 0 < max_receive_bytes <= MAX_MESSAGE_BYTES:
        raise ValueError(f"max_receive_bytes must be in (0, {MAX_MESSAGE_BYTES}], "
                         f"got {max_receive_bytes}")
    return grpc.aio.server(options=(("grpc.max_receive_message_length", max_receive_bytes),
                                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)))


class Channels:
    """Channels reused across requests (a router dialling instances, a prefill instance
    dialling decode instances)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, endpoint: str) -> grpc.aio.Channel:
        if endpoint not in self._channels:
            self._channels[endpoint] = insecure_channel(endpoint)
        return self._channels[endpoint]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
