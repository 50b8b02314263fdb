"""free_port / wait_for_port against real sockets."""

from __future__ import annotations

import socket
import time

import pytest

from services.local.ports import free_port, wait_for_port, wait_for_port_async


def test_free_port_can_be_bound():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_port_returns_once_listening():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        wait_for_port("127.0.0.1", listener.getsockname()[1], timeout=2.0)


def test_wait_for_port_times_out_on_a_closed_port():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=str(port)):
        wait_for_port("127.0.0.1", port, timeout=0.2)
    assert time.monotonic() - started < 2.0


async def test_wait_for_port_async_both_ways():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        await wait_for_port_async("127.0.0.1", listener.getsockname()[1], timeout=2.0)
    with pytest.raises(TimeoutError):
        await wait_for_port_async("127.0.0.1", free_port(), timeout=0.2)
