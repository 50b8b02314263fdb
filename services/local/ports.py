"""TCP port helpers for tests and local runs: pick a free port, wait until one accepts."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque

_HANDED_OUT: deque[int] = deque(maxlen=512)  # ports this process returned recently


def free_port(host: str = "127.0.0.1", attempts: int = 64) -> int:
    """Returns a port that was free a moment ago (the OS picked it for a socket bound to 0),
    and not one this process handed out recently: the OS may offer a port again as long as its
    first taker has not bound it yet (two workers started back to back got the same port).

    Another process may take it before the caller binds it; servers that can bind to port 0
    themselves and report the port should prefer that.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise RuntimeError(f"no fresh free port on {host} in {attempts} attempts")


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Blocks until a TCP connect to host:port succeeds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{host}:{port} did not accept within {timeout}s: {last_error}")
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 1.0)):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(min(0.02, max(remaining, 0)))


async def wait_for_port_async(host: str, port: int, timeout: float) -> None:
    """The asyncio form of `wait_for_port`, for use inside a running event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: OSError | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"{host}:{port} did not accept within {timeout}s: {last_error}")
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=min(remaining, 1.0)
            )
        except (OSError, TimeoutError) as exc:
            last_error = exc if isinstance(exc, OSError) else OSError(str(exc))
            await asyncio.sleep(min(0.02, max(remaining, 0)))
            continue
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return
