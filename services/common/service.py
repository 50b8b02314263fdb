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

from services.common.channels import new_server
from services.common.control import connect
from services.common.health import ServiceHealth, add_health
from services.common.heartbeat import HeartbeatPublisher
from services.common.logging import LEVELS, configure_logging
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
        if self.log_level.lower() not in LEVELS:
            raise ValueError(f"--log-level must be one of {sorted(LEVELS)}, got {self.log_level!r}")

    def advertised(self, port: int) -> str:
        return f"{self.advertise_host or self.host}:{port}"


class Service:
    """Subclasses set `role` (a states.Role value) and override the hooks they need."""

    role = ""

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
        if cfg.nats_url:
            self.nc = await connect(cfg.nats_url, self.instance_id)
        await self.setup()
        self.server = new_server(self.max_request_bytes())
        self.health = await add_health(self.server)
        registered = ServiceNames(self.server)
        self.add_servicers(registered)
        add_reflection(self.server, registered.names)
        self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        await self.server.start()
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
            await self.stop_core()
            if self.heartbeat is not None:
                await self.heartbeat.stop()

        await drain(health=self.health, grace_s=cfg.drain_grace_s,
                    finish_in_flight=self.finish_in_flight, server=self.server,
                    server_grace_s=SERVER_GRACE_S, after_server=after_server, nc=self.nc,
                    step_timeout_s=cfg.drain_timeout_s)
