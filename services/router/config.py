"""Router settings (flags / EPSERVE_* variables, see services/common/settings.py); the fields
every service has are in services/common/service.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.service import ServiceConfig

BALANCERS = ("load", "rr")


@dataclass(frozen=True)
class RouterConfig(ServiceConfig):
    model_name: str = field(default="", metadata={
        "help": "model id clients name in requests (default: the directory's basename)"})
    http_port: int = field(default=-1, metadata={
        "help": "OpenAI-compatible HTTP API port (-1 off, 0 any): /v1/completions, "
                "/v1/chat/completions, /v1/models"})
    # admission and choice
    max_inflight: int = field(default=64, metadata={
        "help": "requests in flight at once; more are rejected (RESOURCE_EXHAUSTED), never queued"})
    balancer: str = field(default="load", metadata={
        "help": "instance choice: load (prefill/decode load balancers) or rr (round-robin)"})
    # membership (heartbeat_interval_s is also the period expected from instances)
    dead_after_missed: int = field(default=3, metadata={
        "help": "an instance not heard from for this many intervals takes no new requests"})
    instance_wait_s: float = field(default=300.0, metadata={
        "help": "at start, SERVING only once a prefill and a decode instance are eligible; "
                "none after this long: exit (1) to be restarted"})
    # requests
    request_timeout_s: float = field(default=300.0, metadata={
        "help": "deadline of one request end to end (every internal call inherits it)"})
    prefill_retries: int = field(default=1, metadata={
        "help": "re-drives of a failed prefill (another instance when there is one)"})
    decode_attempts: int = field(default=3, metadata={
        "help": "decode instances tried when one refuses a request (full, draining)"})
    usage_spool_dir: str = field(default="", metadata={
        "help": "usage records wait here (on disk) while JetStream cannot take them, and are "
                "published when it can, also by the next process (default: a temp dir)"})
    # failover
    migration_limit: int = field(default=3, metadata={
        "help": "times a request may move to another decode instance when its own fails, "
                "stalls or is cut off (0 = never)"})
    failover_wait_s: float = field(default=20.0, metadata={
        "help": "a request waits this long for an instance to become eligible again when all "
                "of a role are known but none is (restarting, suspected)"})
    token_gap_floor_s: float = field(default=2.0, metadata={
        "help": "a decode stream silent for max(this, 8 x the slow token gaps measured) is "
                "moved (its instance is stalled or cut off)"})
    prefill_floor_s: float = field(default=5.0, metadata={
        "help": "a prefill call is given max(this, 8 x the slow prefills measured, per token) "
                "before it is re-driven elsewhere"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be -1 (off) or a port, got {self.http_port}")
        if self.max_inflight < 1:
            raise ValueError(f"--max-inflight must be >= 1, got {self.max_inflight}")
        if self.balancer not in BALANCERS:
            raise ValueError(f"--balancer must be one of {'|'.join(BALANCERS)}, "
                             f"got {self.balancer!r}")
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
        if self.migration_limit < 0:
            raise ValueError("--migration-limit must be >= 0")
        if self.failover_wait_s < 0:
            raise ValueError("--failover-wait-s must be >= 0")
        if not 0 < self.token_gap_floor_s <= self.request_timeout_s:
            raise ValueError("--token-gap-floor-s must be in (0, --request-timeout-s]")
        if not 0 < self.prefill_floor_s <= self.request_timeout_s:
            raise ValueError("--prefill-floor-s must be in (0, --request-timeout-s]")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model).resolve().name

    @property
    def dead_after_s(self) -> float:
        """Silence after which an instance is no longer eligible."""
        return self.heartbeat_interval_s * self.dead_after_missed
