"""One service lifecycle for every epserve process: start -> serve -> drain -> stop.

A service is a subclass of `Service` that fills in a few hooks; `run()` does the rest, in the
same order for all six services:

start   logging -> NATS (when configured) -> `setup()` (build the core: load weights, open
        buckets) -> gRPC server with health (NOT_SERVING), `add_servicers()` and reflection
        for what they registered (services/common/reflection.py) -> Prometheus
        /metrics -> heartbeats (STARTING) -> `until_ready()` (wait for peers: topology,
        instances) -> port file -> heartbeats SERVING -> health SERVING.
serve   until SIGTERM/SIGINT (a second signal is ignored, see shutdown.py).
drain   `begin_drain()` (refuse new work) -> heartbeats DRAINING -> health NOT_SERVING ->
        grace -> `finish_in_flight()` -> gRPC server stop -> `stop_core()` -> heartbeats stop
        -> NATS drain -> exit 0.
Every step of the drain has a deadline (`drain_timeout_s`): a peer that never answers (NATS
down, a stuck stream) delays the exit by at most that much per step, never forever.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from services.common import mesh_tls
from services.common.channels import new_server
from services.common.control import connect
from services.common.health import ServiceHealth, add_health
from services.common.heartbeat import HeartbeatPublisher
from services.common.logging import LEVELS, configure_logging
from services.common.mesh_tls import MeshTLS
from services.common.metrics_http import start_metrics_http
from services.common.reflection import ServiceNames, add_reflection
from services.common.shutdown import StopEvent, bounded, drain, install_signal_handlers
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("service")
SERVER_GRACE_S = 5.0  # in-flight RPCs get this long once the server stops accepting


@dataclass(frozen=True)
class ServiceConfig:
    """The settings every service has (each service's config adds its own fields)."""

    model: str = field(default="", metadata={"help": "checkpoint directory"})
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server"})
    instance_id: str = field(default="", metadata={
        "help": "unique member id (default: ROLE-HOST-PID)"})
    host: str = field(default="127.0.0.1", metadata={"help": "gRPC listen host"})
    advertise_host: str = field(default="", metadata={
        "help": "host others reach this service at (default: --host)"})
    port: int = field(default=0, metadata={"help": "gRPC listen port (0 = pick a free one)"})
    port_file: str = field(default="", metadata={"help": "write the bound port here"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus port (-1 off, 0 any)"})
    heartbeat_interval_s: float = field(default=0.5, metadata={"help": "heartbeat period"})
    drain_grace_s: float = field(default=0.0, metadata={
        "help": "NOT_SERVING this long before waiting for in-flight work"})
    drain_timeout_s: float = field(default=30.0, metadata={
        "help": "deadline of each drain step (in-flight work, NATS flush): SIGTERM always exits"})
    log_level: str = field(default="info", metadata={"help": "debug|info|warning|error"})
    # The mesh identity (services/common/mesh_tls.py; made by `epserve certs`): none given is
    # plaintext, with a warning. The router's public API stays outside the mesh.
    tls_dir: str = field(default="", metadata={
        "help": "mTLS identity directory: tls.crt, tls.key, ca.crt (a Kubernetes TLS Secret)"})
    tls_cert: str = field(default="", metadata={"help": "mTLS certificate (instead of --tls-dir)"})
    tls_key: str = field(default="", metadata={"help": "mTLS private key"})
    tls_ca: str = field(default="", metadata={"help": "the mesh CA certificate"})
    health_port: int = field(default=-1, metadata={
        "help": "plaintext port serving only grpc.health.v1 (Kubernetes probes cannot present "
                "a client certificate; -1 off, 0 any)"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be -1 (off) or a port, got {self.metrics_port}")
        if not self.heartbeat_interval_s > 0:
            raise ValueError(f"--heartbeat-interval-s must be > 0, got {self.heartbeat_interval_s}")
        if self.drain_grace_s < 0:
            raise ValueError(f"--drain-grace-s must be >= 0, got {self.drain_grace_s}")
        if not self.drain_timeout_s > 0:
            raise ValueError(f"--drain-timeout-s must be > 0, got {self.drain_timeout_s}")
        if not -1 <= self.health_port <= 65535:
            raise ValueError(f"--health-port must be -1 (off) or a port, got {self.health_port}")
        # TLSConfigError (a ValueError) when incomplete; the files are read at start
        mesh_tls.check_settings(self.tls_dir, self.tls_cert, self.tls_key, self.tls_ca)
        if self.log_level.lower() not in LEVELS:
            raise ValueError(f"--log-level must be one of {sorted(LEVELS)}, got {self.log_level!r}")

    def tls(self) -> MeshTLS | None:
        """The identity the TLS settings name (None: plaintext)."""
        return mesh_tls.from_settings(self.tls_dir, self.tls_cert, self.tls_key, self.tls_ca)

    def advertised(self, port: int) -> str:
        return f"{self.advertise_host or self.host}:{port}"


class Service:
    """Subclasses set `role` (a states.Role value) and override the hooks they need."""

    role = ""
    # An internal service: with an identity, its server takes only mTLS peers and checks
    # each call against the role table (services/common/authz.py). The router sets False:
    # its server is the public API (API keys), while its channels to instances use mTLS.
    mesh_server = True

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.instance_id = cfg.instance_id or f"{self.role}-{socket.gethostname()}-{os.getpid()}"
        self.started_at = time.time()  # heartbeats carry it: occupancy counts from here
        self.nc = None
        self.server: grpc.aio.Server | None = None
        self.health: ServiceHealth | None = None
        self.heartbeat: HeartbeatPublisher | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.tls: MeshTLS | None = None
        self._health_server: grpc.aio.Server | None = None

    # ---- hooks ----------------------------------------------------------------------------
    def log_rank(self) -> int | str | None:
        """Bound into every log line beside the service name."""
        return None

    async def setup(self) -> None:
        """Build the core (NATS is connected when configured; the server is not up yet)."""

    def add_servicers(self, server: grpc.aio.Server) -> None:
        """Register this service's gRPC servicers."""

    def max_request_bytes(self) -> int | None:
        """The largest request message the gRPC server takes (None: channels' one limit)."""
        return None

    def heartbeat_fields(self) -> dict:
        """Extra HeartbeatPublisher arguments: load=, rank=, placement_version=, endpoint=."""
        return {}

    async def until_ready(self) -> None:
        """Wait for what serving needs from peers (the server answers health meanwhile)."""

    def ready_fields(self) -> dict:
        """Extra fields of the `<role>_ready` log event."""
        return {}

    def begin_drain(self) -> None:
        """The first thing a drain does: refuse new work."""

    async def finish_in_flight(self) -> None:
        """Return once the work already accepted is done."""

    async def stop_core(self) -> None:
        """Stop background tasks and close clients (after the gRPC server stopped)."""

    # ---- the lifecycle --------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.cfg.advertised(self.port)

    async def start(self) -> None:
        cfg = self.cfg
        configure_logging(self.role, self.log_rank(), cfg.log_level)
        self.tls = cfg.tls()
        self._check_identity()
        mesh_tls.install(self.tls)  # every channel this process dials to a peer uses it
        if cfg.nats_url:
            self.nc = await connect(cfg.nats_url, self.instance_id,
                                    tls=self.tls.ssl_context() if self.tls else None)
        await self.setup()
        mesh = self.tls is not None and self.mesh_server
        self.server = new_server(self.max_request_bytes(), mesh=mesh)
        self.health = await add_health(self.server)
        registered = ServiceNames(self.server)
        self.add_servicers(registered)
        add_reflection(self.server, registered.names)
        address = f"{cfg.host}:{cfg.port}"
        self.port = (self.server.add_secure_port(address, self.tls.server_credentials()) if mesh
                     else self.server.add_insecure_port(address))
        await self.server.start()
        if cfg.health_port >= 0:
            self._health_server, self.health_port = await self._start_health_port()
        if cfg.metrics_port >= 0:
            self.metrics_port = start_metrics_http(cfg.metrics_port, cfg.host)
        if self.nc is not None:
            fields = {"endpoint": self.endpoint, **self.heartbeat_fields()}
            self.heartbeat = HeartbeatPublisher(
                self.nc, self.role, self.instance_id, interval_s=cfg.heartbeat_interval_s,
                metrics_endpoint=cfg.advertised(self.metrics_port) if self.metrics_port else "",
                started_at=self.started_at,
                **fields)
            self.heartbeat.start()
        await self.until_ready()
        if cfg.port_file:
            Path(cfg.port_file).write_text(str(self.port))
        if self.heartbeat is not None:
            await self.heartbeat.set_state(control_pb2.STATE_SERVING)
        await self.health.set_serving()
        log.info(f"{self.role.replace('-', '_')}_ready", endpoint=self.endpoint,
                 metrics_port=self.metrics_port, **self.ready_fields())

    def _check_identity(self) -> None:
        if self.tls is None:
            log.warning("mtls_off", hint="no --tls-dir: peers are not authenticated")
            return
        if self.tls.role != self.role:
            raise mesh_tls.TLSConfigError(
                f"the certificate is for role {self.tls.role!r}, this service is {self.role!r}")
        log.info("mtls_on", role=self.tls.role, instance=self.tls.instance,
                 mesh_server=self.mesh_server)

    async def _start_health_port(self) -> tuple[grpc.aio.Server, int]:
        """A second, plaintext server answering only health, mirroring the main one's states:
        what a Kubernetes gRPC probe (no client certificate) can reach. It serves nothing
        else, so it gives an unauthenticated caller no more than the probe's answer."""
        server = new_server()
        health = await add_health(server)
        self.health.mirror = health
        port = server.add_insecure_port(f"{self.cfg.host}:{self.cfg.health_port}")
        await server.start()
        return server, port

    async def run(self) -> int:
        """Start, serve until a stop signal, drain; the process's exit code."""
        await self.start()
        stop = StopEvent()

        async def on_stop() -> None:
            await self.drain()
            stop.set("signal")

        install_signal_handlers(asyncio.get_running_loop(), on_stop)
        await stop.wait()
        log.info(f"{self.role.replace('-', '_')}_stopped")
        return 0

    async def drain(self) -> None:
        cfg = self.cfg
        self.begin_drain()
        if self.heartbeat is not None:
            await bounded("heartbeat_draining",
                          self.heartbeat.set_state(control_pb2.STATE_DRAINING), cfg.drain_timeout_s)

        async def after_server() -> None:
            if self._health_server is not None:
                await self._health_server.stop(0)
            await self.stop_core()
            if self.heartbeat is not None:
                await self.heartbeat.stop()

        await drain(health=self.health, grace_s=cfg.drain_grace_s,
                    finish_in_flight=self.finish_in_flight, server=self.server,
                    server_grace_s=SERVER_GRACE_S, after_server=after_server, nc=self.nc,
                    step_timeout_s=cfg.drain_timeout_s)
