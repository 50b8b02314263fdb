"""Graceful shutdown for asyncio services.

Every service runs it through services/common/service.py (`Service.run`).

Drain order, and why:
1. health NOT_SERVING   — load balancers and probes stop sending new work here;
2. grace (`grace_s`)    — give them time to notice (a probe period);
3. finish in-flight     — requests already admitted complete (no lost request);
4. `server.stop(grace)` — close the gRPC server, cancelling what still runs after its grace;
5. after the server     — stop background tasks, close clients;
6. `nc.drain()`         — flush pending NATS publishes and unsubscribe, then close;
7. exit.
Steps 3, 5 and 6 have a deadline each, so a drain always ends.
The first SIGTERM/SIGINT starts the drain once; further signals are logged and ignored, so an
impatient second Ctrl-C cannot interrupt a drain half-way (SIGKILL still can).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

from services.common.health import ServiceHealth

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopEvent:
    """Set once when the service should exit; `main` awaits `wait()`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason: str | None = None

    def set(self, reason: str = "requested") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> str | None:
        await self._event.wait()
        return self.reason


class SignalHandlers:
    """The installed handlers; `stop_task` is the drain once a signal arrived."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_stop: Callable[[], Awaitable[Any]],
        signals: tuple[int, ...],
    ) -> None:
        self._loop = loop
        self._on_stop = on_stop
        self.signals = signals
        self.stop_task: asyncio.Task | None = None
        self.signals_seen: list[int] = []

    def _handle(self, sig: int) -> None:
        self.signals_seen.append(sig)
        name = signal.Signals(sig).name
        if self.stop_task is not None:
            log.warning("signal_ignored_already_stopping", signal=name)
            return
        log.info("stop_signal_received", signal=name)
        self.stop_task = self._loop.create_task(self._run_on_stop())

    async def _run_on_stop(self) -> None:
        try:
            await self._on_stop()
        except Exception:
            log.exception("stop_handler_failed")
            raise

    def uninstall(self) -> None:
        """Removes the handlers (the default signal behaviour comes back)."""
        for sig in self.signals:
            self._loop.remove_signal_handler(sig)


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    on_stop: Callable[[], Awaitable[Any]],
    signals: Iterable[int] = STOP_SIGNALS,
) -> SignalHandlers:
    """Runs `on_stop()` once, as a task, on the first of `signals`; later ones are ignored."""
    handlers = SignalHandlers(loop, on_stop, tuple(signals))
    for sig in handlers.signals:
        loop.add_signal_handler(sig, handlers._handle, sig)
    return handlers


async def drain(
    *,
    health: ServiceHealth | None = None,
    grace_s: float = 0.0,
    finish_in_flight: Callable[[], Awaitable[Any]] | None = None,
    server: Any | None = None,
    server_grace_s: float | None = 5.0,
    after_server: Callable[[], Awaitable[Any]] | None = None,
    nc: Any | None = None,
    step_timeout_s: float | None = None,
) -> None:
    """The documented drain order; each part is optional.

    `server` is a grpc.aio.Server (anything with `async stop(grace)`), `nc` a nats-py client
    (anything with `async drain()`); typed loosely so this module needs neither at import.
    `after_server` runs once the server is stopped (background tasks, clients). With
    `step_timeout_s`, finishing in-flight work, `after_server` and the NATS drain each get at
    most that long (a NATS drain that times out closes the client instead): a peer that never
    answers cannot keep the process from exiting.
    """
    log.info("drain_started", grace_s=grace_s)
    if health is not None:
        await health.enter_graceful_shutdown()
    if grace_s > 0:
        await asyncio.sleep(grace_s)
    if finish_in_flight is not None:
        await bounded("finish_in_flight", finish_in_flight(), step_timeout_s)
    if server is not None:
        await server.stop(server_grace_s)
    if after_server is not None:
        await bounded("after_server", after_server(), step_timeout_s)
    if nc is not None and not getattr(nc, "is_closed", False):
        if not await bounded("nats_drain", nc.drain(), step_timeout_s):
            await bounded("nats_close", nc.close(), step_timeout_s)
    log.info("drain_finished")


async def bounded(step: str, awaitable: Awaitable[Any], timeout_s: float | None) -> bool:
    """Await one drain step for at most `timeout_s` (None: no limit); False, logged, when it
    timed out or failed (the drain goes on either way)."""
    try:
        await asyncio.wait_for(awaitable, timeout_s)
        return True
    except TimeoutError:
        log.warning("drain_step_timed_out", step=step, timeout_s=timeout_s)
    except Exception as exc:
        log.warning("drain_step_failed", step=step, error=str(exc))
    return False
