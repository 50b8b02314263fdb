"""Settings prefill and decode instances share (flags / EPSERVE_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.service import ServiceConfig
from services.engine.wire import WIRE_MODES


@dataclass(frozen=True)
class AttentionConfig(ServiceConfig):
    wire: str = field(default="fp32", metadata={"help": "expert dispatch wire: fp32|bf16|fp8"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda:N"})
    expert_timeout_s: float = field(default=30.0, metadata={"help": "deadline per dispatch"})
    topology_wait_s: float = field(default=300.0, metadata={"help": "wait for expert workers"})
    trace: str = field(default="", metadata={
        "help": "write a Chrome trace JSON of the EP forward passes here (Perfetto / "
                "chrome://tracing): compute and communication tracks, a span per micro-batch "
                "per layer per op; rewritten every few seconds and at shutdown"})
    trace_max_events: int = field(default=200_000, metadata={
        "help": "stop recording trace spans after this many (the file says how many dropped)"})
    speculative: str = field(default="off", metadata={
        "help": "speculative decoding with the checkpoint's multi-token-prediction layer: "
                "mtp on a decode instance drafts one token per step (the output is "
                "unchanged); on a prefill instance it runs the layer over each prompt and "
                "sends its KV and first draft with the prompt's; off"})
    plan_poll_s: float = field(default=0.2, metadata={
        "help": "how often to read the scheduler's overlap plan from NATS KV"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.nats_url:
            raise ValueError("--nats-url is required")
        if self.wire not in WIRE_MODES:
            raise ValueError(f"--wire must be one of {sorted(WIRE_MODES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("--dtype must be float32 or bfloat16")
        if self.trace_max_events <= 0:
            raise ValueError("--trace-max-events must be > 0")
        if self.speculative not in ("off", "mtp"):
            raise ValueError("--speculative must be off or mtp")
        if self.plan_poll_s <= 0:
            raise ValueError("--plan-poll-s must be > 0")
