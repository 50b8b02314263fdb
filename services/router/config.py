"""Router settings (flags / EPSERVE_* variables, see services/common/settings.py); the fields
every service has are in services/common/service.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.channels import MAX_MESSAGE_BYTES
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
    # work before admission (checked before anything is tokenised)
    max_prompt_bytes: int = field(default=0, metadata={
        "help": "longest prompt tokenised, in UTF-8 bytes (the text, or the chat turns' roles "
                "and contents); longer: INVALID_ARGUMENT / HTTP 400 at once. 0 = the model's "
                "context x its longest token in bytes, the most that can fit the context"})
    max_request_bytes: int = field(default=0, metadata={
        "help": "largest HTTP body and gRPC request message; larger: HTTP 413 / "
                "RESOURCE_EXHAUSTED before parsing. 0 = 6 x the prompt limit + 1 MiB (a prompt "
                "at the limit with every byte JSON-escaped, and the rest of the request)"})
    tokenize_threads: int = field(default=2, metadata={
        "help": "threads tokenising prompts off the event loop; at most --max-inflight "
                "prompts tokenise or wait at once, more: RESOURCE_EXHAUSTED / HTTP 429"})
    # requests
    request_timeout_s: float = field(default=300.0, metadata={
        "help": "deadline of one request end to end (every internal call inherits it)"})
    prefill_retries: int = field(default=1, metadata={
        "help": "re-drives of a failed prefill (another instance when there is one)"})
    decode_attempts: int = field(default=3, metadata={
        "help": "decode instances tried when one refuses a request (full, draining)"})
    api_keys: bool = field(default=False, metadata={
        "help": "require an API key on every call (HTTP `Authorization: Bearer`, gRPC metadata "
                "`authorization`), with its per-key limits; keys from `epserve keys create`"})
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
        if self.max_prompt_bytes < 0 or self.max_request_bytes < 0:
            raise ValueError("--max-prompt-bytes and --max-request-bytes must be >= 0 "
                             "(0 = derived from the model)")
        if not 0 <= self.max_request_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"--max-request-bytes must be at most {MAX_MESSAGE_BYTES}")
        if self.tokenize_threads < 1:
            raise ValueError(f"--tokenize-threads must be >= 1, got {self.tokenize_threads}")
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

    def prompt_bytes_limit(self, context_length: int, longest_token_bytes: int) -> int:
        """--max-prompt-bytes, or the most bytes a prompt that fits the context can have: every
        token stands for at most `longest_token_bytes` bytes, so a text of more than context x
        that many bytes has more tokens than the context holds (it is refused untokenised)."""
        return self.max_prompt_bytes or context_length * longest_token_bytes

    def request_bytes_limit(self, prompt_bytes_limit: int) -> int:
        """--max-request-bytes, or room for a prompt at the limit JSON-escaped byte by byte
        (\\u00XX: six each) and 1 MiB for the rest (never above the gRPC message limit)."""
        return self.max_request_bytes or min(6 * prompt_bytes_limit + (1 << 20),
                                             MAX_MESSAGE_BYTES)

    @property
    def dead_after_s(self) -> float:
        """Silence after which an instance is no longer eligible."""
        return self.heartbeat_interval_s * self.dead_after_missed
