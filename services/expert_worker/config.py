"""Expert-worker settings (flags / EPSERVE_* variables, see services/common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertWorkerConfig:
    model: str = field(default="", metadata={"help": "checkpoint directory"})
    rank: int = field(default=0, metadata={"help": "EP rank of this worker"})
    placement: str = field(default="", metadata={"help": "placement table JSON file"})
    num_workers: int = field(default=0, metadata={
        "help": "with no --placement: build the contiguous placement for this many workers"})
    redundant_experts: int = field(default=0, metadata={"help": "redundant slots (no --placement)"})
    host: str = field(default="127.0.0.1", metadata={"help": "gRPC listen host"})
    advertise_host: str = field(default="", metadata={"help": "host others dial (default host)"})
    advertise_port: int = field(default=0, metadata={
        "help": "port others dial, e.g. a proxy's (default: the bound port)"})
    heartbeat_interval_s: float = field(default=0.5, metadata={"help": "heartbeat period"})
    load_report_interval_s: float = field(default=1.0, metadata={
        "help": "publish per-expert load on NATS this often (0 = never)"})
    release_after_s: float = field(default=5.0, metadata={
        "help": "after a rebalance, free an old placement's slots once unused this long"})
    topology_poll_s: float = field(default=0.25, metadata={
        "help": "how often to look for a new placement version in NATS"})
    port: int = field(default=0, metadata={"help": "gRPC listen port (0 = pick a free one)"})
    port_file: str = field(default="", metadata={"help": "write the bound port here"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus port (-1 off, 0 any)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda:N"})
    cpu_cores: str = field(default="", metadata={"help": "pin to these CPU cores, e.g. 0,1"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype: float32|bfloat16"})
    nats_url: str = field(default="", metadata={"help": "NATS server for the control plane"})
    drain_grace_s: float = field(default=0.0, metadata={"help": "NOT_SERVING before closing"})
    log_level: str = field(default="info", metadata={"help": "debug|info|warning|error"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if self.rank < 0:
            raise ValueError("--rank must be >= 0")
        if not self.placement and self.num_workers <= 0 and not self.nats_url:
            raise ValueError("give --placement FILE, --nats-url URL or --num-workers N")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be cpu or cuda:N, got {self.device!r}")
        if self.load_report_interval_s < 0 or self.release_after_s < 0:
            raise ValueError("--load-report-interval-s and --release-after-s must be >= 0")
        if self.topology_poll_s <= 0:
            raise ValueError("--topology-poll-s must be > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("--dtype must be float32 or bfloat16")

    @property
    def core_list(self) -> list[int]:
        return [int(c) for c in self.cpu_cores.split(",") if c.strip()]
