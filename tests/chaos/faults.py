"""The fault injector: signals by pid, and link faults through an expert worker's link proxy.

Kinds: `sigkill`, `sigterm` (a graceful drain), `sigstop` (SIGCONT after `hold_s`), and for
expert workers the link in front of them (`epserve link-proxy` control port):
`blackhole` (`stall`: connections stay open, nothing is forwarded, `resume` after `hold_s`),
`reset` (`drop`: every open connection is cut with an RST) and `latency` (`latency MS` for
`hold_s`, then back to 0).

Targets are process names of a LocalCluster: `router-i`, `scheduler`, `prefill-i`, `decode-i`,
`expert-worker-r`, `nats`. A process is only ever signalled by the pid it has at the moment
of the fault (the supervisor restarts it under a new pid), and only while it runs. Every
fault that holds something (a stopped process, a stalled link, added latency) is undone by
`repair()` after its hold, and `Injector.close()` undoes whatever is still held, so a failed
test never leaves a process stopped or a link stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass

from services.local.link_proxy import send_control_async

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigstop": signal.SIGSTOP}
LINK_KINDS = ("blackhole", "reset", "latency")
KINDS = (*SIGNALS, *LINK_KINDS)
HELD = ("sigstop", "blackhole", "latency")  # undone after hold_s
CONTROL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str  # a process name
    hold_s: float = 3.0
    latency_ms: float = 250.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind in LINK_KINDS and not self.target.startswith("expert-worker-"):
            raise ValueError(f"link faults are for expert workers, not {self.target!r}")
        if self.hold_s < 0 or self.latency_ms < 0:
            raise ValueError("hold_s and latency_ms must be >= 0")

    @property
    def held(self) -> bool:
        return self.kind in HELD

    @property
    def rank(self) -> int:
        return int(self.target.rsplit("-", 1)[1])

    def describe(self) -> str:
        extra = f" {self.hold_s:g}s" if self.held else ""
        if self.kind == "latency":
            extra = f" +{self.latency_ms:g}ms{extra}"
        return f"{self.kind} {self.target}{extra}"


@dataclass
class Fired:
    fault: Fault
    t: float  # time.monotonic() when it was applied
    pid: int | None
    detail: str = ""
    repaired_t: float | None = None


class FaultError(RuntimeError):
    pass


class Injector:
    """Applies faults to one LocalCluster; `close()` repairs whatever is still held."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.fired: list[Fired] = []
        self._repairs: list[asyncio.Task] = []

    def pid_of(self, name: str) -> int | None:
        if name == "nats":
            nats = self.cluster.nats
            return nats.pid if nats is not None and nats.is_running() else None
        proc = self.cluster.process(name)
        return proc.pid if proc.is_running() else None

    def _signal(self, name: str, sig: int) -> int:
        pid = self.pid_of(name)
        if pid is None:
            raise FaultError(f"{name} is not running: no pid to signal")
        if name == "nats":
            os.kill(pid, sig)  # NatsServer has no send_signal; its pid is its own child's
        else:
            self.cluster.process(name).send_signal(sig)  # checks the child is not reaped
        return pid

    async def _control(self, rank: int, command: str) -> str:
        host, port = self.cluster.link_controls[rank]
        return await send_control_async(host, port, command, timeout=CONTROL_TIMEOUT_S)

    async def fire(self, fault: Fault) -> Fired:
        """Applies `fault` now; a held fault is repaired by a background task after hold_s."""
        t = time.monotonic()
        pid, detail = None, ""
        if fault.kind in SIGNALS:
            pid = self._signal(fault.target, SIGNALS[fault.kind])
        else:
            pid = self.pid_of(f"link-proxy-{fault.rank}")
            command = {"blackhole": "stall", "reset": "drop",
                       "latency": f"latency {fault.latency_ms:g}"}[fault.kind]
            detail = await self._control(fault.rank, command)
        fired = Fired(fault, t, pid, detail)
        self.fired.append(fired)
        if fault.held:
            self._repairs.append(asyncio.create_task(self._repair_later(fired)))
        return fired

    async def _repair_later(self, fired: Fired) -> None:
        await asyncio.sleep(max(0.0, fired.t + fired.fault.hold_s - time.monotonic()))
        await self.repair(fired)

    async def repair(self, fired: Fired) -> None:
        """Undoes a held fault (SIGCONT to the same pid, resume, latency 0); idempotent."""
        if fired.repaired_t is not None or not fired.fault.held:
            return
        f = fired.fault
        if f.kind == "sigstop":
            # the pid stopped, not whoever has the name now: a stopped process is not restarted,
            # so it is still the same one unless it was killed meanwhile
            with contextlib.suppress(ProcessLookupError):
                if fired.pid is not None and self.pid_of(f.target) == fired.pid:
                    os.kill(fired.pid, signal.SIGCONT)
        elif f.kind == "blackhole":
            await self._control(f.rank, "resume")
        elif f.kind == "latency":
            await self._control(f.rank, "latency 0")
        fired.repaired_t = time.monotonic()

    async def wait_repaired(self, timeout: float) -> None:
        if self._repairs:
            await asyncio.wait_for(asyncio.gather(*self._repairs), timeout)
            self._repairs.clear()

    async def close(self) -> None:
        """Repairs everything still held, whatever happened before."""
        for task in self._repairs:
            task.cancel()
        await asyncio.gather(*self._repairs, return_exceptions=True)
        self._repairs.clear()
        for fired in self.fired:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.repair(fired), CONTROL_TIMEOUT_S + 1)
