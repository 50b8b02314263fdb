"""Scheduler settings (flags / EPSERVE_* variables, see services/common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.service import ServiceConfig

SPLIT_POLICIES = ("balanced_attention", "even_tokens")


@dataclass(frozen=True)
class SchedulerConfig(ServiceConfig):
    # model and initial expert placement (used only while NATS holds no topology yet)
    expert_workers: int = field(default=0, metadata={"help": "expert workers (EP ranks), E"})
    redundant_experts: int = field(default=0, metadata={"help": "redundant expert slots, R"})
    instance_id: str = field(default="scheduler", metadata={"help": "this scheduler's member id"})
    # membership (every instance heartbeats at heartbeat_interval_s, this scheduler too)
    dead_after_missed: int = field(default=3, metadata={
        "help": "an instance silent for this many intervals is marked DEAD"})
    member_refresh_s: float = field(default=2.0, metadata={
        "help": "rewrite a live member's KV record at least this often"})
    forget_dead_after_s: float = field(default=3600.0, metadata={
        "help": "delete a DEAD member's record after this long (0 = keep forever)"})
    lost_worker_grace_s: float = field(default=15.0, metadata={
        "help": "an expert-worker rank without a serving worker this long is lost: experts "
                "only it held are placed on the live workers"})
    # initial overlap plan (used only while NATS holds no plan yet)
    micro_batches: int = field(default=1, metadata={"help": "micro-batches per step: 1 or 2"})
    split_policy: str = field(default="balanced_attention", metadata={
        "help": "micro-batch split: " + " | ".join(SPLIT_POLICIES)})
    min_batch_tokens: int = field(default=16, metadata={"help": "below this, overlap is off"})
    fixed_split: bool = field(default=False, metadata={
        "help": "split every step micro-batches / min-batch-tokens allow, instead of letting "
                "each instance measure whether two micro-batches pay"})
    # live expert rebalancing (EPLB); off unless a threshold or a period is given
    rebalance_threshold: float = field(default=0.0, metadata={
        "help": "re-plan when the placement's balancedness (mean/max worker load) on the load "
                "window drops below this, in (0, 1]; 0 = off"})
    rebalance_period_s: float = field(default=0.0, metadata={
        "help": "also re-plan this often (0 = off)"})
    rebalance_cooldown_s: float = field(default=60.0, metadata={
        "help": "no new plan sooner than this after the last one"})
    rebalance_check_s: float = field(default=2.0, metadata={
        "help": "how often the rebalancing rule is evaluated"})
    load_window_s: float = field(default=30.0, metadata={
        "help": "sliding window of expert-load reports the planner uses"})
    rebalance_min_tokens: int = field(default=256, metadata={
        "help": "routed tokens per MoE layer needed in the window before re-planning"})
    eplb_nodes: int = field(default=1, metadata={"help": "nodes the expert workers span"})
    eplb_groups: int = field(default=0, metadata={
        "help": "expert groups for hierarchical placement (0 = the model's n_group)"})
    eplb_policy: str = field(default="auto", metadata={"help": "auto | hierarchical | global"})
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_workers < 1:
            raise ValueError(f"--expert-workers must be >= 1, got {self.expert_workers}")
        if self.redundant_experts < 0:
            raise ValueError(f"--redundant-experts must be >= 0, got {self.redundant_experts}")
        if not self.instance_id:
            raise ValueError("--instance-id must not be empty")
        if self.dead_after_missed < 1:
            raise ValueError(f"--dead-after-missed must be >= 1, got {self.dead_after_missed}")
        if self.member_refresh_s <= 0:
            raise ValueError(f"--member-refresh-s must be > 0, got {self.member_refresh_s}")
        if self.lost_worker_grace_s <= 0:
            raise ValueError("--lost-worker-grace-s must be > 0")
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
        if not 0 <= self.rebalance_threshold <= 1:
            raise ValueError(f"--rebalance-threshold must be in [0, 1], got "
                             f"{self.rebalance_threshold}")
        if self.rebalance_cooldown_s < 0:
            raise ValueError("--rebalance-cooldown-s must be >= 0")
        if self.rebalance_period_s < 0 or self.rebalance_check_s <= 0 or self.load_window_s <= 0:
            raise ValueError("--rebalance-period-s must be >= 0, --rebalance-check-s and "
                             "--load-window-s > 0")
        if self.rebalance_min_tokens < 0 or self.eplb_nodes < 1 or self.eplb_groups < 0:
            raise ValueError("--rebalance-min-tokens >= 0, --eplb-nodes >= 1, --eplb-groups >= 0")
        if self.eplb_policy not in ("auto", "hierarchical", "global"):
            raise ValueError(f"--eplb-policy must be auto|hierarchical|global, got "
                             f"{self.eplb_policy!r}")
        if not self.nats_url:
            raise ValueError("--nats-url is required")

    @property
    def dead_after_s(self) -> float:
        """Silence longer than this marks an instance DEAD."""
        return self.dead_after_missed * self.heartbeat_interval_s
