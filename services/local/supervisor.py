"""`epserve up` supervises like a Deployment/StatefulSet: an exited process is restarted.

`RestartBackoff` is the pure rule (no clock of its own): the first restart after `initial_s`,
each next one twice as late up to `max_s`; a process that stayed up `reset_after_s` starts
from `initial_s` again. `Supervisor` applies it to named processes from a daemon thread:
each keeps its argv, so its role, instance id, EP rank and port are the same after a restart.
Every restart is logged (`process_restarted`, with the exit code) and counted.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("supervisor")


@dataclass
class RestartBackoff:
    initial_s: float = 0.5
    max_s: float = 10.0
    reset_after_s: float = 30.0
    _delay: dict[str, float] = field(default_factory=dict)

    def delay(self, name: str, up_for_s: float) -> float:
        """How long to wait before restarting `name`, which exited after `up_for_s` up."""
        previous = self._delay.get(name)
        if previous is None or up_for_s >= self.reset_after_s:
            delay = self.initial_s
        else:
            delay = min(self.max_s, previous * 2)
        self._delay[name] = delay
        return delay


@dataclass
class Supervised:
    """What the supervisor needs of a process: is it up, start it again, its exit code."""

    name: str
    is_running: Callable[[], bool]
    restart: Callable[[], object]
    exit_code: Callable[[], int | None] = lambda: None
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # set once it is seen down


class Supervisor:
    def __init__(self, backoff: RestartBackoff | None = None, poll_s: float = 0.1) -> None:
        self.backoff = backoff or RestartBackoff()
        self.poll_s = poll_s
        self.restarts: Counter[str] = Counter()
        self._procs: dict[str, Supervised] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_restart: Callable[[str, int | None, int], None] | None = None

    def watch(self, proc: Supervised) -> None:
        with self._lock:
            self._procs[proc.name] = proc

    def tick(self, now: float) -> list[str]:
        """One look at every process: schedule restarts, do those that are due."""
        restarted = []
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.is_running():
                continue
            if p.restart_at is None:
                p.restart_at = now + self.backoff.delay(p.name, now - p.started_at)
                log.warning("process_exited", name=p.name, code=p.exit_code(),
                            restart_in_s=round(p.restart_at - now, 2))
                continue
            if now < p.restart_at:
                continue
            code = p.exit_code()
            try:
                p.restart()
            except Exception as exc:  # a port not free yet, say: try again after the backoff
                log.error("process_restart_failed", name=p.name, error=str(exc))
                p.restart_at = now + self.backoff.delay(p.name, 0.0)
                continue
            p.started_at, p.restart_at = now, None
            self.restarts[p.name] += 1
            restarted.append(p.name)
            log.warning("process_restarted", name=p.name, exit_code=code,
                        restarts=self.restarts[p.name])
            if self.on_restart is not None:
                self.on_restart(p.name, code, self.restarts[p.name])
        return restarted

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.tick(time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
