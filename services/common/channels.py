"""One gRPC channel per peer endpoint, reused across requests (a router dialling instances, a
prefill instance dialling decode instances)."""

from __future__ import annotations

import grpc


class Channels:
    def __init__(self, max_message_bytes: int = 64 << 20) -> None:
        self.options = [("grpc.max_receive_message_length", max_message_bytes),
                        ("grpc.max_send_message_length", max_message_bytes)]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, endpoint: str) -> grpc.aio.Channel:
        if endpoint not in self._channels:
            self._channels[endpoint] = grpc.aio.insecure_channel(endpoint, options=self.options)
        return self._channels[endpoint]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
