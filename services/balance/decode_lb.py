"""Decode load balancer: which decode instance takes a request after its prefill.

Two loads to balance across decode instances (DeepSeek's V3/R1 inference system): KV-cache
usage (blocks in use as a fraction of the instance's blocks: memory is what runs out) and the
number of running requests (each decode step costs per request). Each is estimated as the
instance's last report plus what this router sent since (ledger.py). An instance where the
request's blocks no longer fit is chosen only when none has room.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.balance.kv_reservation import kv_blocks_needed
from services.balance.ledger import DispatchLedger, estimate
from services.balance.scoring import active_only, check_weights, pick_lowest
from services.common.states import InstanceState


@dataclass(frozen=True)
class DecodeInstanceLoad:
    instance_id: str
    kv_blocks_in_use: int
    kv_blocks_total: int
    running_requests: int
    state: InstanceState = InstanceState.SERVING
    acked_seq: int | None = None  # highest dispatch seq from this router the figures include
    block_tokens: int | None = None  # the instance's tokens per KV block (None: the config's)

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("instance_id must be non-empty")
        object.__setattr__(self, "state", InstanceState(self.state))
        if self.kv_blocks_total < 1:
            raise ValueError(f"{self.instance_id}: kv_blocks_total must be >= 1")
        if self.kv_blocks_in_use < 0 or self.running_requests < 0:
            raise ValueError(f"{self.instance_id}: reported loads must be >= 0")
        if self.acked_seq is not None and self.acked_seq < 0:
            raise ValueError(f"{self.instance_id}: acked_seq must be >= 0")


@dataclass(frozen=True)
class DecodeBalancerConfig:
    block_tokens: int = 64  # tokens per KV block, for instances that do not report theirs
    # Output tokens a request is counted with. None: all of max_new_tokens, capped by the
    # context, which is what a decode instance reserves (kv_reservation.py); a cap makes the
    # estimate optimistic, for instances that reserve less.
    output_reserve_tokens: int | None = None
    context_tokens: int | None = None  # the model's context, the cap of a reservation
    kv_weight: float = 1.0
    request_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")
        if self.output_reserve_tokens is not None and self.output_reserve_tokens < 0:
            raise ValueError("output_reserve_tokens must be >= 0")
        check_weights(kv_weight=self.kv_weight, request_weight=self.request_weight)

    def blocks_for(self, prompt_len: int, max_new_tokens: int,
                   block_tokens: int | None = None) -> int:
        output = max_new_tokens if self.output_reserve_tokens is None else min(
            max_new_tokens, self.output_reserve_tokens)
        return kv_blocks_needed(prompt_len, output, block_tokens or self.block_tokens,
                                self.context_tokens)


class DecodeBalancer:
    """Pure bookkeeping: the router calls choose, then on_dispatched, later on_finished."""

    def __init__(self, config: DecodeBalancerConfig | None = None) -> None:
        self.config = config or DecodeBalancerConfig()
        self._ledger = DispatchLedger(dimensions=2)  # (kv blocks, requests)

    def estimated_loads(
        self, instances: Sequence[DecodeInstanceLoad]
    ) -> dict[str, tuple[float, float]]:
        """instance id -> (kv blocks, requests): report plus not-yet-reported dispatches."""
        return {
            i.instance_id: estimate(
                self._ledger,
                i.instance_id,
                i.acked_seq,
                (float(i.kv_blocks_in_use), float(i.running_requests)),
            )
            for i in instances
        }

    def choose(
        self, instances: Sequence[DecodeInstanceLoad], prompt_len: int, max_new_tokens: int = 0
    ) -> str:
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        active = active_only(instances)
        loads = self.estimated_loads(active)
        need = {i.instance_id: self.config.blocks_for(prompt_len, max_new_tokens, i.block_tokens)
                for i in active}
        fits = [i for i in active
                if loads[i.instance_id][0] + need[i.instance_id] <= i.kv_blocks_total]
        candidates = fits or active  # all full: the least-full fraction still wins below
        # Fair shares over all active instances (not just those with room): the cluster's KV
        # fraction and its mean request count after this request.
        fair_kv = (sum(b for b, _ in loads.values()) + max(need.values())) / sum(
            i.kv_blocks_total for i in active
        )
        fair_requests = (sum(r for _, r in loads.values()) + 1) / len(active)
        ids = [i.instance_id for i in candidates]
        ratios = [
            (
                (loads[i.instance_id][0] + need[i.instance_id]) / i.kv_blocks_total / fair_kv,
                (loads[i.instance_id][1] + 1) / fair_requests,
            )
            for i in candidates
        ]
        weights = (self.config.kv_weight, self.config.request_weight)
        return pick_lowest(ids, ratios, weights)

    def on_dispatched(
        self, instance_id: str, request_id: str, prompt_len: int, max_new_tokens: int = 0,
        block_tokens: int | None = None,
    ) -> int:
        """Record a sent request; returns the dispatch seq the instance should echo."""
        blocks = float(self.config.blocks_for(prompt_len, max_new_tokens, block_tokens))
        return self._ledger.record(instance_id, request_id, (blocks, 1.0))

    def on_finished(self, request_id: str) -> None:
        """The request left the instance (finished, failed, cancelled or migrated)."""
        self._ledger.finish(request_id)

    @property
    def unreported(self) -> int:
        return len(self._ledger)
