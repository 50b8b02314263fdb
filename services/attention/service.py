"""What prefill and decode instances share: settings, start-up and shutdown.

Start-up: logging -> NATS -> attention-only model (no routed experts) -> wait for the
scheduler's expert topology -> EP client -> gRPC server with health -> heartbeats. Shutdown
drains in the documented order (services/common/shutdown.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from services.attention.plan_watch import PlanWatcher
from services.attention.topology import EPInstance
from services.common import subjects
from services.common.control import connect, kv_bucket
from services.common.health import add_health
from services.common.heartbeat import HeartbeatPublisher
from services.common.logging import configure_logging
from services.common.metrics_http import start_metrics_http
from services.common.shutdown import StopEvent, drain, install_signal_handlers
from services.engine.trace import ChromeTrace
from services.engine.wire import WIRE_MODES
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("attention_service")
GRPC_OPTIONS = [("grpc.max_receive_message_length", 512 << 20),
                ("grpc.max_send_message_length", 512 << 20)]


@dataclass(frozen=True)
class AttentionConfig:
    model: str = field(default="", metadata={"help": "checkpoint directory"})
    nats_url: str = field(default="", metadata={"help": "NATS server, e.g. nats://127.0.0.1:4222"})
    instance_id: str = field(default="", metadata={"help": "unique id (default role-host-pid)"})
    host: str = field(default="127.0.0.1", metadata={"help": "gRPC listen host"})
    advertise_host: str = field(default="", metadata={"help": "host others dial (default host)"})
    port: int = field(default=0, metadata={"help": "gRPC port (0 = pick a free one)"})
    port_file: str = field(default="", metadata={"help": "write the bound port here"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus port (-1 off, 0 any)"})
    wire: str = field(default="fp32", metadata={"help": "expert dispatch wire: fp32|bf16|fp8"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda:N"})
    expert_timeout_s: float = field(default=30.0, metadata={"help": "deadline per dispatch"})
    topology_wait_s: float = field(default=300.0, metadata={"help": "wait for expert workers"})
    heartbeat_interval_s: float = field(default=0.5, metadata={"help": "heartbeat period"})
    drain_grace_s: float = field(default=0.0, metadata={"help": "NOT_SERVING before draining"})
    log_level: str = field(default="info", metadata={"help": "debug|info|warning|error"})
    trace: str = field(default="", metadata={
        "help": "write a Chrome trace JSON of the EP forward passes here (Perfetto / "
                "chrome://tracing): compute and communication tracks, a span per micro-batch "
                "per layer per op; rewritten every few seconds and at shutdown"})
    trace_max_events: int = field(default=200_000, metadata={
        "help": "stop recording trace spans after this many (the file says how many dropped)"})
    plan_poll_s: float = field(default=0.2, metadata={
        "help": "how often to read the scheduler's overlap plan from NATS KV"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if not self.nats_url:
            raise ValueError("--nats-url is required")
        if self.wire not in WIRE_MODES:
            raise ValueError(f"--wire must be one of {sorted(WIRE_MODES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("--dtype must be float32 or bfloat16")
        if self.trace_max_events <= 0:
            raise ValueError("--trace-max-events must be > 0")
        if self.plan_poll_s <= 0:
            raise ValueError("--plan-poll-s must be > 0")


class AttentionService:
    """Holds the shared pieces; `role` is "prefill" or "decode"."""

    def __init__(self, cfg: AttentionConfig, role: str) -> None:
        self.cfg, self.role = cfg, role
        self.instance_id = cfg.instance_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
        self.model_cfg = ModelConfig.from_dir(cfg.model)
        self.nc = None
        self.instance: EPInstance | None = None
        self.server: grpc.aio.Server | None = None
        self.health = None
        self.heartbeat: HeartbeatPublisher | None = None
        self.plan_watcher: PlanWatcher | None = None
        self.tracer: ChromeTrace | None = None
        self.endpoint = ""

    async def start(self, add_servicers: Callable[[grpc.aio.Server], None],
                    load: Callable[[], control_pb2.InstanceLoad]) -> None:
        cfg = self.cfg
        configure_logging(self.role, self.instance_id, cfg.log_level)
        self.nc = await connect(cfg.nats_url, self.instance_id)
        js = self.nc.jetstream()
        topology_kv = await kv_bucket(js, subjects.TOPOLOGY_BUCKET)
        plan_kv = await kv_bucket(js, subjects.PLAN_BUCKET)
        model = load_model(cfg.model, experts=no_experts(self.model_cfg), dtype=cfg.dtype,
                           device=cfg.device)
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        self.health = await add_health(self.server)
        add_servicers(self.server)
        port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        await self.server.start()
        self.endpoint = f"{cfg.advertise_host or cfg.host}:{port}"
        metrics_port = start_metrics_http(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
        self.instance = EPInstance(model, topology_kv, cfg.wire, cfg.expert_timeout_s,
                                   name=self.instance_id)
        self.heartbeat = HeartbeatPublisher(
            self.nc, self.role, self.instance_id, self.endpoint, cfg.heartbeat_interval_s, load,
            placement_version=lambda: self.instance.placement_version,
            metrics_endpoint=f"{cfg.advertise_host or cfg.host}:{metrics_port}" if metrics_port else "")
        self.heartbeat.start()
        await self.instance.start(cfg.topology_wait_s)
        engine = self.instance.engine
        if cfg.trace:
            self.tracer = ChromeTrace(cfg.trace, f"{self.role} {self.instance_id}",
                                      cfg.trace_max_events)
            engine.tracer = self.tracer
        # The scheduler's overlap plan; the engine adopts each new one at its next step.
        self.plan_watcher = await PlanWatcher(
            plan_kv, lambda plan: setattr(engine, "plan", plan), cfg.plan_poll_s).start()
        if cfg.port_file:
            Path(cfg.port_file).write_text(str(port))
        await self.heartbeat.set_state(control_pb2.STATE_SERVING)
        await self.health.set_serving()
        log.info(f"{self.role}_ready", endpoint=self.endpoint, metrics_port=metrics_port,
                 placement_version=self.instance.placement_version)

    async def run_until_stopped(self, finish_in_flight: Callable[[], Awaitable[None]],
                                stop_core: Callable[[], Awaitable[None]]) -> int:
        stop = StopEvent()

        async def on_stop() -> None:
            await self.heartbeat.set_state(control_pb2.STATE_DRAINING)
            await drain(health=self.health, grace_s=self.cfg.drain_grace_s,
                        finish_in_flight=finish_in_flight, server=self.server, server_grace_s=5.0)
            await stop_core()
            await self.heartbeat.stop()
            if self.plan_watcher is not None:
                await self.plan_watcher.stop()
            if self.tracer is not None:
                log.info("trace_written", path=str(self.tracer.write()),
                         events=len(self.tracer.events), dropped=self.tracer.dropped)
            await self.instance.close()
            await self.nc.drain()
            stop.set("signal")

        install_signal_handlers(asyncio.get_running_loop(), on_stop)
        await stop.wait()
        log.info(f"{self.role}_stopped")
        return 0
