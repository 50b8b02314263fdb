"""Signal handling and the drain order for asyncio services."""

from __future__ import annotations

import asyncio
import os
import signal

from structlog.testing import capture_logs

from services.common.shutdown import StopEvent, drain, install_signal_handlers


async def wait_until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


async def test_stop_event_keeps_the_first_reason():
    stop = StopEvent()
    assert not stop.is_set()
    stop.set("signal")
    stop.set("second")
    assert stop.is_set()
    assert await asyncio.wait_for(stop.wait(), 1.0) == "signal"


async def test_first_signal_drains_once_and_second_is_ignored():
    calls: list[str] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def on_stop() -> None:
        calls.append("drain")
        started.set()
        await release.wait()

    handlers = install_signal_handlers(asyncio.get_running_loop(), on_stop)
    try:
        with capture_logs() as logs:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(started.wait(), 5.0)
            os.kill(os.getpid(), signal.SIGINT)  # mid-drain: must not start a second one
            await wait_until(lambda: len(handlers.signals_seen) == 2)
            release.set()
            await asyncio.wait_for(handlers.stop_task, 5.0)
    finally:
        handlers.uninstall()
    assert calls == ["drain"]
    assert handlers.signals_seen == [signal.SIGTERM, signal.SIGINT]
    events = [(e["event"], e.get("signal")) for e in logs]
    assert ("stop_signal_received", "SIGTERM") in events
    assert ("signal_ignored_already_stopping", "SIGINT") in events


class Recorder:
    """Fakes of the health, gRPC server and NATS client that record the call order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.is_closed = False

    async def enter_graceful_shutdown(self) -> None:
        self.calls.append("health_not_serving")

    async def finish_in_flight(self) -> None:
        self.calls.append("finish_in_flight")

    async def stop(self, grace: float | None) -> None:
        self.calls.append(f"server_stop({grace})")

    async def drain(self) -> None:
        self.calls.append("nats_drain")


async def test_drain_runs_in_the_documented_order():
    rec = Recorder()
    await drain(
        health=rec,  # type: ignore[arg-type]
        grace_s=0.01,
        finish_in_flight=rec.finish_in_flight,
        server=rec,
        server_grace_s=2.0,
        nc=rec,
    )
    assert rec.calls == [
        "health_not_serving",
        "finish_in_flight",
        "server_stop(2.0)",
        "nats_drain",
    ]


async def test_drain_skips_a_closed_nats_client_and_missing_parts():
    rec = Recorder()
    rec.is_closed = True
    await drain(nc=rec)
    assert rec.calls == []
