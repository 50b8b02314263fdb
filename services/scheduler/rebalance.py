"""Live expert-placement rebalancing, the pure part: a sliding window of per-expert loads and
the decision to re-plan (no I/O, no clock of its own: callers pass `now`).

Expert workers report the tokens each logical expert received since their last report. The
window sums the reports of the last `window_s` seconds. A re-plan happens when the placement in
service balances the window worse than `threshold` (mean/max worker load, averaged over layers,
the same measure as the benchmark), or when `period_s` has passed since the last plan, and only
with at least `min_tokens` routed tokens in the window (too little traffic says nothing).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from services.balance.eplb import EplbConfig, placement_balancedness, plan
from services.balance.placement import PlacementTable
from services.protos_gen.epserve.v1 import control_pb2

MIN_GAIN = 0.01  # balancedness a re-plan must add to be rolled out


class ReportRejected(ValueError):
    """A load report that does not fit the model's layers or experts."""


class LoadWindow:
    def __init__(self, window_s: float, layer_ids: tuple[int, ...], num_experts: int) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s, self.layer_ids, self.num_experts = window_s, tuple(layer_ids), num_experts
        self._rows = {layer: i for i, layer in enumerate(self.layer_ids)}
        self._reports: deque[tuple[float, np.ndarray]] = deque()

    def add(self, report: control_pb2.ExpertLoadReport, now: float) -> None:
        n = report.num_logical_experts
        if n != self.num_experts:
            raise ReportRejected(f"rank {report.rank}: {n} experts, the model has "
                                 f"{self.num_experts}")
        if len(report.logical_tokens) != len(report.layer_ids) * n:
            raise ReportRejected(f"rank {report.rank}: logical_tokens has "
                                 f"{len(report.logical_tokens)} entries, expected "
                                 f"{len(report.layer_ids)} x {n}")
        loads = np.zeros((len(self.layer_ids), n), dtype=np.float64)
        flat = np.asarray(report.logical_tokens, dtype=np.float64).reshape(-1, n)
        for row, layer in zip(flat, report.layer_ids, strict=True):
            if layer not in self._rows:
                raise ReportRejected(f"rank {report.rank}: layer {layer} is not a MoE layer")
            loads[self._rows[layer]] += row
        self._reports.append((now, loads))
        self._expire(now)

    def loads(self, now: float) -> np.ndarray:
        """[layers, experts]: tokens per logical expert over the window."""
        self._expire(now)
        total = np.zeros((len(self.layer_ids), self.num_experts), dtype=np.float64)
        for _, loads in self._reports:
            total += loads
        return total

    def clear(self) -> None:
        """After a re-plan: the next decision judges the new placement on fresh traffic."""
        self._reports.clear()

    def _expire(self, now: float) -> None:
        while self._reports and now - self._reports[0][0] > self.window_s:
            self._reports.popleft()


@dataclass(frozen=True)
class RebalancePolicy:
    threshold: float = 0.0  # re-plan when balancedness < threshold (0 = never for imbalance)
    period_s: float = 0.0  # re-plan at least this often (0 = never on a period)
    min_tokens: int = 256  # routed tokens (per layer, on average) needed in the window
    cooldown_s: float = 60.0  # no new plan sooner than this after the last one
    num_nodes: int = 1
    num_groups: int = 1
    policy: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 or self.period_s > 0


def decide(current: PlacementTable, loads: np.ndarray, now: float, last_plan_at: float,
           policy: RebalancePolicy) -> str | None:
    """Why to re-plan now ("imbalance 0.61 < 0.80", "period"), or None."""
    if not policy.enabled or now - last_plan_at < policy.cooldown_s:
        return None
    if loads.sum() / max(1, loads.shape[0]) < policy.min_tokens:
        return None
    balance = placement_balancedness(current, loads)
    if policy.threshold > 0 and balance < policy.threshold:
        return f"imbalance: balancedness {balance:.3f} < {policy.threshold:.3f}"
    if policy.period_s > 0 and now - last_plan_at >= policy.period_s:
        return f"period: {now - last_plan_at:.0f}s since the last plan"
    return None


def replan(current: PlacementTable, loads: np.ndarray, policy: RebalancePolicy
           ) -> PlacementTable | None:
    """The next version for these loads, or None when it would place every slot as now or
    would not raise the balancedness by at least MIN_GAIN (a roll-out moves weights)."""
    config = EplbConfig(num_slots=current.num_slots, num_workers=current.num_workers,
                        num_nodes=policy.num_nodes, num_groups=policy.num_groups,
                        policy=policy.policy)
    new = plan(loads, config, previous=current)
    if new.phy2log == current.phy2log:
        return None
    gain = placement_balancedness(new, loads) - placement_balancedness(current, loads)
    return new if gain >= MIN_GAIN else None
