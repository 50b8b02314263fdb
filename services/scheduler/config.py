"""Scheduler settings (flags / EPSERVE_* variables, see services/common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.logging import LEVELS

SPLIT_POLICIES = ("balanced_attention", "even_tokens")


@dataclass(frozen=True)
class SchedulerConfig:
    # model and initial expert placement (used only while NATS holds no topology yet)
    model: str = field(default="", metadata={"help": "checkpoint directory (expert count, layers)"})
    expert_workers: int = field(default=0, metadata={"help": "expert workers (EP ranks), E"})
    redundant_experts: int = field(default=0, metadata={"help": "redundant expert slots, R"})
    # control plane
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server"})
    instance_id: str = field(default="scheduler", metadata={"help": "this scheduler's member id"})
    # membership
    heartbeat_interval_s: float = field(default=0.5, metadata={
        "help": "interval every instance heartbeats at (also this scheduler's own)"})
    dead_after_missed: int = field(default=3, metadata={
        "help": "an instance silent for this many intervals is marked DEAD"})
    member_refresh_s: float = field(default=2.0, metadata={
        "help": "rewrite a live member's KV record at least this often"})
    forget_dead_after_s: float = field(default=3600.0, metadata={
        "help": "delete a DEAD member's record after this long (0 = keep forever)"})
    # initial overlap plan (used only while NATS holds no plan yet)
    micro_batches: int = field(default=1, metadata={"help": "micro-batches per step: 1 or 2"})
    split_policy: str = field(default="balanced_attention", metadata={
        "help": "micro-batch split: " + " | ".join(SPLIT_POLICIES)})
    min_batch_tokens: int = field(default=16, metadata={"help": "below this, overlap is off"})
    # serving
    host: str = field(default="127.0.0.1", metadata={"help": "gRPC (health) listen host"})
    port: int = field(default=0, metadata={"help": "gRPC listen port (0 = pick a free one)"})
    port_file: str = field(default="", metadata={"help": "write the bound port here"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus port (-1 off, 0 any)"})
    drain_grace_s: float = field(default=0.0, metadata={"help": "NOT_SERVING before closing"})
    log_level: str = field(default="info", metadata={"help": "debug|info|warning|error"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if self.expert_workers < 1:
            raise ValueError(f"--expert-workers must be >= 1, got {self.expert_workers}")
        if self.redundant_experts < 0:
            raise ValueError(f"--redundant-experts must be >= 0, got {self.redundant_experts}")
        if not self.nats_url:
            raise ValueError("--nats-url is required")
        if not self.instance_id:
            raise ValueError("--instance-id must not be empty")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"--heartbeat-interval-s must be > 0, got {self.heartbeat_interval_s}")
        if self.dead_after_missed < 1:
            raise ValueError(f"--dead-after-missed must be >= 1, got {self.dead_after_missed}")
        if self.member_refresh_s <= 0:
            raise ValueError(f"--member-refresh-s must be > 0, got {self.member_refresh_s}")
        if self.forget_dead_after_s < 0:
            raise ValueError(f"--forget-dead-after-s must be >= 0, got {self.forget_dead_after_s}")
        if self.micro_batches not in (1, 2):
            raise ValueError(f"--micro-batches must be 1 or 2, got {self.micro_batches}")
        if self.split_policy not in SPLIT_POLICIES:
            raise ValueError(
                f"--split-policy must be one of {list(SPLIT_POLICIES)}, got {self.split_policy!r}"
            )
        if self.min_batch_tokens < 0:
            raise ValueError(f"--min-batch-tokens must be >= 0, got {self.min_batch_tokens}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ValueError(f"--metrics-port must be -1 or in [0, 65535], got {self.metrics_port}")
        if self.drain_grace_s < 0:
            raise ValueError(f"--drain-grace-s must be >= 0, got {self.drain_grace_s}")
        if self.log_level.lower() not in LEVELS:
            raise ValueError(f"--log-level must be one of {sorted(LEVELS)}, got {self.log_level!r}")

    @property
    def dead_after_s(self) -> float:
        """Silence longer than this marks an instance DEAD."""
        return self.dead_after_missed * self.heartbeat_interval_s
