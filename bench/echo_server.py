"""A bare gRPC bidirectional stream for the transport floor (bench/bench_transport.py).

Raw bytes, no protobuf: each request's first 8 bytes say how many bytes to answer, the next
8 for how many microseconds to keep the core busy first (an expert worker's compute: while it
runs, the caller sleeps, and waking a process that slept costs more than one that did not), and
the answer is a preallocated buffer of that size. Run as a process of its own, as an expert worker
is, so the floor crosses the same loopback, the same grpc.aio stacks and a process boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc

from services.common.channels import GRPC_OPTIONS

METHOD = "/bench.Echo/Stream"


async def serve(port_file: Path) -> None:
    buffers: dict[int, bytes] = {}

    async def stream(request_iterator, context):
        async for request in request_iterator:
            size = int.from_bytes(request[:8], "little")
            busy_s = int.from_bytes(request[8:16], "little") / 1e6
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < busy_s:  # spin: compute holds the core
                pass
            if size not in buffers:
                buffers[size] = bytes(size)
            yield buffers[size]

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    asyncio.run(serve(parser.parse_args().port_file))


if __name__ == "__main__":
    main()
