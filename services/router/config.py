"""Router settings (flags / EPSERVE_* variables, see services/common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.logging import LEVELS

BALANCERS = ("load", "rr")


@dataclass(frozen=True)
class RouterConfig:
    # model
    model: str = field(default="", metadata={"help": "checkpoint directory (config + tokenizer)"})
    model_name: str = field(default="", metadata={
        "help": "model id clients name in requests (default: the directory's basename)"})
    instance_id: str = field(default="", metadata={
        "help": "this router's member id (default router-HOST-PID)"})
    # endpoints
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server"})
    host: str = field(default="127.0.0.1", metadata={"help": "gRPC listen host"})
    advertise_host: str = field(default="", metadata={
        "help": "host others reach this service at (default: --host)"})
    port: int = field(default=0, metadata={"help": "gRPC listen port (0 = pick a free one)"})
    port_file: str = field(default="", metadata={"help": "write the bound port here"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus port (-1 off, 0 any)"})
    http_port: int = field(default=-1, metadata={
        "help": "OpenAI-compatible HTTP API port (-1 off, 0 any): /v1/completions, "
                "/v1/chat/completions, /v1/models"})
    # admission and choice
    max_inflight: int = field(default=64, metadata={
        "help": "requests in flight at once; more are rejected (RESOURCE_EXHAUSTED), never queued"})
    balancer: str = field(default="load", metadata={
        "help": "instance choice: load (prefill/decode load balancers) or rr (round-robin)"})
    # membership
    heartbeat_interval_s: float = field(default=0.5, metadata={
        "help": "heartbeat period (own heartbeats; also the period expected from instances)"})
    dead_after_missed: int = field(default=3, metadata={
        "help": "an instance not heard from for this many intervals takes no new requests"})
    instance_wait_s: float = field(default=30.0, metadata={
        "help": "at start, wait this long for a prefill and a decode instance before SERVING"})
    # requests
    request_timeout_s: float = field(default=300.0, metadata={
        "help": "deadline of one request end to end (every internal call inherits it)"})
    prefill_retries: int = field(default=1, metadata={
        "help": "re-drives of a failed prefill (another instance when there is one)"})
    decode_attempts: int = field(default=3, metadata={
        "help": "decode instances tried when one refuses a request (full, draining)"})
    # lifecycle
    drain_grace_s: float = field(default=0.0, metadata={
        "help": "NOT_SERVING this long before waiting for in-flight requests"})
    log_level: str = field(default="info", metadata={"help": "debug|info|warning|error"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be -1 (off) or a port, got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be -1 (off) or a port, got {self.http_port}")
        if self.max_inflight < 1:
            raise ValueError(f"--max-inflight must be >= 1, got {self.max_inflight}")
        if self.balancer not in BALANCERS:
            raise ValueError(f"--balancer must be one of {'|'.join(BALANCERS)}, "
                             f"got {self.balancer!r}")
        if not self.heartbeat_interval_s > 0:
            raise ValueError("--heartbeat-interval-s must be > 0")
        if self.dead_after_missed < 1:
            raise ValueError("--dead-after-missed must be >= 1")
        if self.instance_wait_s < 0:
            raise ValueError("--instance-wait-s must be >= 0")
        if not self.request_timeout_s > 0:
            raise ValueError("--request-timeout-s must be > 0")
        if self.prefill_retries < 0:
            raise ValueError("--prefill-retries must be >= 0")
        if self.decode_attempts < 1:
            raise ValueError("--decode-attempts must be >= 1")
        if self.drain_grace_s < 0:
            raise ValueError("--drain-grace-s must be >= 0")
        if self.log_level.lower() not in LEVELS:
            raise ValueError(f"--log-level must be one of {sorted(LEVELS)}")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model).resolve().name

    @property
    def dead_after_s(self) -> float:
        """Silence after which an instance is no longer eligible."""
        return self.heartbeat_interval_s * self.dead_after_missed
