"""A TCP proxy that imitates a network link: latency, bandwidth, drops and stalls.

Chaos tests and the overlap benchmark put it between two processes (for example an attention
instance and an expert worker) to give loopback gRPC a realistic wire. It forwards raw bytes,
so HTTP/2 (gRPC) passes through unchanged.

Link model, per direction of each connection:
- a chunk of n bytes read at time t starts on the wire when the wire is free,
  `start = max(t, wire_free_at)`, and occupies it for `n*8 / (mbps*1e6)` seconds (a token bucket
  with no burst; no bandwidth limit = zero wire time);
- it is written `latency_ms` after it left the wire: `due = start + wire_time + latency`.
Reading never waits for `due` (a pipeline): chunks read 1 ms apart arrive 1 ms apart, each
`latency_ms` late, in order. At most `max_buffer_bytes` wait in the pipe per direction; then
the proxy stops reading and TCP back-pressure reaches the sender.

Commands (methods here, or lines on the control port, see `ControlServer`):
`drop` closes every open connection (RST to both ends; new connections are accepted as usual),
`stall` stops forwarding while keeping connections open, `resume` forwards again (everything
held back is delivered, in order), `latency MS` and `bandwidth MBPS|off` change the link for
chunks read from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

CHUNK_BYTES = 64 * 1024
DEFAULT_MAX_BUFFER_BYTES = 8 * 1024 * 1024


def validate_link(latency_ms: float, bandwidth_mbps: float | None) -> None:
    if latency_ms < 0:
        raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
    if bandwidth_mbps is not None and bandwidth_mbps <= 0:
        raise ValueError(f"bandwidth_mbps must be > 0 or None, got {bandwidth_mbps}")


@dataclass
class LinkStats:
    connections_total: int = 0
    bytes_by_direction: dict[str, int] = field(
        default_factory=lambda: {"upstream": 0, "downstream": 0}
    )


class _Pipe:
    """One direction of one connection: a reader that stamps chunks, a writer that delivers."""

    def __init__(
        self,
        proxy: LinkProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        self._proxy = proxy
        self._reader = reader
        self._writer = writer
        self._direction = direction
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._buffered = 0
        self._room = asyncio.Event()
        self._room.set()
        self._wire_free_at = 0.0

    def _due(self, now: float, nbytes: int) -> float:
        start = max(now, self._wire_free_at)
        mbps = self._proxy.bandwidth_mbps
        wire_s = nbytes * 8 / (mbps * 1e6) if mbps else 0.0
        self._wire_free_at = start + wire_s
        return self._wire_free_at + self._proxy.latency_ms / 1000.0

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._buffered >= self._proxy.max_buffer_bytes:
                self._room.clear()
                await self._room.wait()
            data = await self._reader.read(CHUNK_BYTES)
            self._buffered += len(data)
            self._queue.put_nowait((self._due(loop.time(), len(data)), data))
            if not data:  # EOF travels the link like data, after everything before it
                return

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self._queue.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._proxy._flowing.wait()  # a stall holds chunks here
            if not data:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._writer.write(data)
            await self._writer.drain()
            self._buffered -= len(data)
            self._room.set()
            self._proxy.stats.bytes_by_direction[self._direction] += len(data)


class _Connection:
    """A client connection and its upstream connection, joined by two pipes."""

    def __init__(
        self,
        proxy: LinkProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._writers = (client[1], upstream[1])
        self._pipes = (
            _Pipe(proxy, client[0], upstream[1], "upstream"),
            _Pipe(proxy, upstream[0], client[1], "downstream"),
        )
        self._tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        self._tasks = [
            asyncio.create_task(loop())
            for pipe in self._pipes
            for loop in (pipe.read_loop, pipe.write_loop)
        ]
        failed = False
        try:
            pending: set[asyncio.Task] = set(self._tasks)
            while pending and not failed:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                failed = any(not t.cancelled() and t.exception() is not None for t in done)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in self._writers:
                if failed:
                    writer.transport.abort()
                else:
                    writer.close()

    def abort(self) -> None:
        """Cuts both TCP connections now (peers see a reset), discarding buffered bytes."""
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()


class LinkProxy:
    """Listens on listen_host:listen_port (0 = pick one, see `.port`) and forwards to upstream."""

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        upstream_host: str,
        upstream_port: int,
        latency_ms: float = 0.0,
        bandwidth_mbps: float | None = None,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
    ) -> None:
        validate_link(latency_ms, bandwidth_mbps)
        if max_buffer_bytes < CHUNK_BYTES:
            raise ValueError(f"max_buffer_bytes must be >= {CHUNK_BYTES}")
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.upstream = (upstream_host, upstream_port)
        self.latency_ms = float(latency_ms)
        self.bandwidth_mbps = bandwidth_mbps
        self.max_buffer_bytes = max_buffer_bytes
        self.stats = LinkStats()
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def upstream_address(self) -> str:
        return f"{self.upstream[0]}:{self.upstream[1]}"

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(
            self._on_client, self.listen_host, self.listen_port, family=socket.AF_INET
        )
        log.info(
            "link_proxy_started",
            listen=self.address,
            upstream=self.upstream_address,
            latency_ms=self.latency_ms,
            bandwidth_mbps=self.bandwidth_mbps,
        )
        return self

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self.drop()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> LinkProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- commands ----------------------------------------------------------------------------

    def drop(self) -> int:
        """Closes every open connection; returns how many."""
        dropped = list(self._connections)
        for conn in dropped:
            conn.abort()
        log.info("link_proxy_dropped", connections=len(dropped))
        return len(dropped)

    def stall(self) -> None:
        self._flowing.clear()
        log.info("link_proxy_stalled")

    def resume(self) -> None:
        self._flowing.set()
        log.info("link_proxy_resumed")

    def set_latency(self, latency_ms: float) -> None:
        validate_link(latency_ms, self.bandwidth_mbps)
        self.latency_ms = float(latency_ms)
        log.info("link_proxy_latency_set", latency_ms=self.latency_ms)

    def set_bandwidth(self, bandwidth_mbps: float | None) -> None:
        validate_link(self.latency_ms, bandwidth_mbps)
        self.bandwidth_mbps = bandwidth_mbps
        log.info("link_proxy_bandwidth_set", bandwidth_mbps=bandwidth_mbps)

    def describe(self) -> dict:
        return {
            "listen": self.address,
            "upstream": self.upstream_address,
            "latency_ms": self.latency_ms,
            "bandwidth_mbps": self.bandwidth_mbps,
            "stalled": self.stalled,
            "open_connections": self.open_connections,
            "connections_total": self.stats.connections_total,
            "bytes": dict(self.stats.bytes_by_direction),
        }

    # -- plumbing ------------------------------------------------------------------------------

    async def _on_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.warning(
                "link_proxy_upstream_unreachable", upstream=self.upstream_address, error=str(exc)
            )
            client_writer.transport.abort()
            return
        conn = _Connection(self, (client_reader, client_writer), upstream)
        self._connections.add(conn)
        self.stats.connections_total += 1
        try:
            await conn.run()
        except asyncio.CancelledError:  # dropped on command, or the proxy stops: done
            pass
        except Exception:  # a handler must not raise into asyncio's server machinery
            log.exception("link_proxy_connection_failed")
        finally:
            self._connections.discard(conn)


class ControlServer:
    """Line-based control port for a LinkProxy, one command per line, one reply line each.

    Commands: `drop`, `stall`, `resume`, `latency MS`, `bandwidth MBPS|off`, `stats`.
    Replies: `ok ...` (stats: `ok {json}`) or `error MESSAGE`.
    """

    def __init__(self, proxy: LinkProxy, host: str = "127.0.0.1", port: int = 0) -> None:
        self.proxy = proxy
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the control server is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> ControlServer:
        self._server = await asyncio.start_server(self._on_client, self.host, self._port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def execute(self, line: str) -> str:
        words = line.split()
        if not words:
            return "error empty command"
        cmd, rest = words[0].lower(), words[1:]
        try:
            if cmd == "drop" and not rest:
                return f"ok dropped {self.proxy.drop()}"
            if cmd == "stall" and not rest:
                self.proxy.stall()
                return "ok stalled"
            if cmd == "resume" and not rest:
                self.proxy.resume()
                return "ok resumed"
            if cmd == "latency" and len(rest) == 1:
                self.proxy.set_latency(float(rest[0]))
                return f"ok latency_ms={self.proxy.latency_ms}"
            if cmd == "bandwidth" and len(rest) == 1:
                mbps = None if rest[0].lower() in ("off", "none") else float(rest[0])
                self.proxy.set_bandwidth(mbps)
                return f"ok bandwidth_mbps={self.proxy.bandwidth_mbps}"
            if cmd == "stats" and not rest:
                return "ok " + json.dumps(self.proxy.describe(), sort_keys=True)
        except ValueError as exc:
            return f"error {exc}"
        return f"error unknown command {line.strip()!r}"

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write((self.execute(line.decode(errors="replace")) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def send_control(host: str, port: int, command: str, timeout: float = 5.0) -> str:
    """Sends one control command from any process; returns the text after `ok`.

    Raises RuntimeError on an `error` reply.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        stream = sock.makefile("rwb")
        stream.write(command.strip().encode() + b"\n")
        stream.flush()
        reply = stream.readline().decode().rstrip("\n")
    return _parse_reply(command, reply)


async def send_control_async(host: str, port: int, command: str, timeout: float = 5.0) -> str:
    """`send_control` for code inside an event loop."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(command.strip().encode() + b"\n")
        await writer.drain()
        reply = (await asyncio.wait_for(reader.readline(), timeout)).decode().rstrip("\n")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return _parse_reply(command, reply)


def _parse_reply(command: str, reply: str) -> str:
    if reply == "ok" or reply.startswith("ok "):
        return reply[3:]
    raise RuntimeError(f"link proxy refused {command.strip()!r}: {reply or '(no reply)'}")
