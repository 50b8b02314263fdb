"""Child processes for integration tests, the demo and the bench: start, wait healthy, stop by pid.

Each child runs in its own process group (a Ctrl-C in the terminal reaches only the parent,
which then stops the children in order), writes stdout/stderr to files in a log directory (a
failing test shows their tails), and is stopped by its pid: SIGTERM, then SIGKILL after a grace.
Children still running when the parent exits normally are stopped by an `atexit` hook; a parent
killed by SIGKILL cannot clean up, which is why tests stop children in `finally`.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from services.common.health import check_health, check_health_sync

EXIT_GRACE_S = 5.0  # per child, for the atexit hook
LOG_TAIL_LINES = 60
CHECK_ATTEMPT_S = 0.5  # one health Check; bounds how late an early exit is noticed


class ServiceStartError(RuntimeError):
    """A child exited or stayed unready during start-up; the message carries its log tail."""


# Children started by this process and not yet stopped, in start order. Keyed by id so the dict
# keeps insertion order; the owner pid stops a forked copy of this process from killing them.
_live: dict[int, subprocess.Popen] = {}
_owner_pid = os.getpid()


def stop_at_exit(proc: subprocess.Popen) -> None:
    """Stops `proc` when this interpreter exits normally, unless `stop_popen` stopped it first."""
    _live[id(proc)] = proc


def _untrack(proc: subprocess.Popen) -> None:
    _live.pop(id(proc), None)


@atexit.register
def _stop_leftover_children() -> None:
    if os.getpid() != _owner_pid:
        return
    for proc in reversed(list(_live.values())):
        stop_popen(proc, EXIT_GRACE_S)


def stop_popen(proc: subprocess.Popen, grace: float) -> int | None:
    """SIGTERM to the child's pid, SIGKILL if it is still alive after `grace` seconds.

    Safe on a child that already exited: `poll()` reaps it first, so a recycled pid is never hit.
    Returns the exit code (negative: killed by that signal).
    """
    try:
        if proc.poll() is not None:
            return proc.returncode
        _signal_pid(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_pid(proc, signal.SIGKILL)
        return proc.wait(timeout=10)
    finally:
        _untrack(proc)


def _signal_pid(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def epserve_argv(*args: str) -> list[str]:
    """The argv that runs `epserve ARGS...` with this interpreter."""
    return [sys.executable, "-m", "services.cli", *args]


def child_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with `overrides` applied (a None value removes the key)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the files as they happen
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class ServiceProcess:
    """One child process with log files, readiness waits and stop-by-pid."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: str | Path,
        env: Mapping[str, str | None] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.name = name
        self.argv = list(argv)
        self.log_dir = Path(log_dir)
        self.env = dict(env or {})
        self.cwd = cwd
        self.stdout_path = self.log_dir / f"{name}.stdout.log"
        self.stderr_path = self.log_dir / f"{name}.stderr.log"
        self._proc: subprocess.Popen | None = None
        self._files: list[IO[bytes]] = []
        # A mesh service (mTLS): health checks present this identity and expect a server of
        # `health_role` (services/common/mesh_tls.py); None checks in plaintext.
        self.health_tls = None
        self.health_role: str | None = None

    @classmethod
    def epserve(
        cls,
        name: str,
        args: Sequence[str],
        log_dir: str | Path,
        env: Mapping[str, str | None] | None = None,
        cwd: str | Path | None = None,
    ) -> ServiceProcess:
        return cls(name, epserve_argv(*args), log_dir, env=env, cwd=cwd)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ServiceProcess:
        """Starts the child (again, after a stop: logs are appended). Returns self."""
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close_files()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stdout = open(self.stdout_path, "ab")  # closed by stop() / the next start()
        stderr = open(self.stderr_path, "ab")
        self._files = [stdout, stderr]
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=child_env(self.env),
            cwd=self.cwd,
            start_new_session=True,
        )
        stop_at_exit(self._proc)
        return self

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM by pid, SIGKILL after `grace` s. Safe to call twice or on a dead child."""
        if self._proc is None:
            return None
        code = stop_popen(self._proc, grace)
        self._close_files()
        return code

    def kill(self) -> int | None:
        """SIGKILL by pid now (chaos tests): no drain, no clean-up in the child."""
        if self._proc is None:
            return None
        _signal_pid(self._proc, signal.SIGKILL)
        return self.stop(grace=10.0)

    def send_signal(self, sig: int) -> None:
        if self._proc is not None:
            _signal_pid(self._proc, sig)

    def __enter__(self) -> ServiceProcess:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for path in (self.stderr_path, self.stdout_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) if parts else "(no log output)"

    # -- readiness -------------------------------------------------------------------------

    def wait_until(
        self, ready: Callable[[float], bool], timeout: float, what: str, poll_s: float = 0.05
    ) -> None:
        """Calls `ready(seconds_left)` until it is true; raises if the child exits or time runs out.

        `ready` gets the time left so that a blocking check can bound itself by it.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited(what)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceStartError(
                    f"{self.name} (pid {self.pid}) not {what} after {timeout}s\n{self.log_tail()}"
                )
            if ready(left):
                return
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))

    def wait_healthy(self, grpc_target: str, timeout: float = 30.0, service: str = "") -> None:
        """Blocks until grpc.health.v1 Check on `grpc_target` says SERVING."""
        self.wait_until(
            lambda left: check_health_sync(grpc_target, min(left, CHECK_ATTEMPT_S), service,
                                           self.health_tls, self.health_role),
            timeout,
            f"SERVING on {grpc_target}",
        )

    async def wait_healthy_async(
        self, grpc_target: str, timeout: float = 30.0, service: str = ""
    ) -> None:
        """`wait_healthy` for async tests: the event loop keeps running while it waits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        what = f"SERVING on {grpc_target}"
        while True:
            self._raise_if_exited(what)
            left = deadline - loop.time()
            if left <= 0:
                raise ServiceStartError(
                    f"{self.name} (pid {self.pid}) not {what} after {timeout}s\n{self.log_tail()}"
                )
            if await check_health(grpc_target, min(left, CHECK_ATTEMPT_S), service,
                                  self.health_tls, self.health_role):
                return
            await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))

    def _raise_if_exited(self, what: str) -> None:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        code = self._proc.poll()
        if code is not None:
            raise ServiceStartError(
                f"{self.name} (pid {self.pid}) exited with code {code} before {what}\n"
                f"{self.log_tail()}"
            )

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []


class ProcessGroup:
    """Several ServiceProcesses started in order and stopped in reverse order.

    Stopping is robust to children that already died (their exit codes are reported).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._procs: list[ServiceProcess] = []

    def start(self, proc: ServiceProcess) -> ServiceProcess:
        self._procs.append(proc)
        return proc.start()

    def start_epserve(
        self, name: str, args: Sequence[str], env: Mapping[str, str | None] | None = None
    ) -> ServiceProcess:
        return self.start(ServiceProcess.epserve(name, args, self.log_dir, env=env))

    def remove(self, proc: ServiceProcess) -> None:
        """Forget a child that is not running (a failed start, to be started anew)."""
        proc.stop()
        self._procs.remove(proc)

    def __getitem__(self, name: str) -> ServiceProcess:
        for proc in self._procs:
            if proc.name == name:
                return proc
        raise KeyError(name)

    def __iter__(self):
        return iter(list(self._procs))

    def __len__(self) -> int:
        return len(self._procs)

    def stop_all(self, grace: float = 10.0) -> dict[str, int | None]:
        """Stops every child, last started first; returns {name: exit code}."""
        codes: dict[str, int | None] = {}
        for proc in reversed(self._procs):
            codes[proc.name] = proc.stop(grace)
        return codes

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log_tail(lines)}" for p in self._procs)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
