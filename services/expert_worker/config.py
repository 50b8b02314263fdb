"""Expert-worker settings (flags / EPSERVE_* variables, see services/common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.cpu_cores import parse_cores
from services.common.service import ServiceConfig


@dataclass(frozen=True)
class ExpertWorkerConfig(ServiceConfig):
    nats_url: str = field(default="", metadata={
        "help": "NATS server for the control plane (none: a standalone worker)"})
    instance_id: str = field(default="", metadata={"help": "member id (default expert-worker-RANK)"})
    rank: int = field(default=0, metadata={"help": "EP rank of this worker"})
    placement: str = field(default="", metadata={"help": "placement table JSON file"})
    num_workers: int = field(default=0, metadata={
        "help": "with no --placement: build the contiguous placement for this many workers"})
    redundant_experts: int = field(default=0, metadata={"help": "redundant slots (no --placement)"})
    advertise_port: int = field(default=0, metadata={
        "help": "port others dial, e.g. a proxy's (default: the bound port)"})
    load_report_interval_s: float = field(default=1.0, metadata={
        "help": "publish per-expert load on NATS this often (0 = never)"})
    release_after_s: float = field(default=5.0, metadata={
        "help": "after a rebalance, free an old placement's slots once unused this long"})
    topology_poll_s: float = field(default=0.25, metadata={
        "help": "how often to look for a new placement version in NATS"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda:N"})
    cpu_cores: str = field(default="", metadata={"help": "pin to these CPU cores, e.g. 0,1"})
    compute_thread: bool = field(default=False, metadata={
        "help": "always compute on a thread of its own (default: on the event loop when "
                "dispatches of that size were measured short)"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype: float32|bfloat16"})

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if not 0 <= self.advertise_port <= 65535:
            raise ValueError(f"--advertise-port must be in [0, 65535], got {self.advertise_port}")

    @property
    def member_id(self) -> str:
        return self.instance_id or f"expert-worker-{self.rank}"

    @property
    def core_list(self) -> list[int]:
        return parse_cores(self.cpu_cores)
