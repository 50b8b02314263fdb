"""Prefill load balancer: which prefill instance takes a new prompt.

Two loads to balance across prefill instances (DeepSeek's V3/R1 inference system):
- core-attention compute, which grows with the square of the input length: the sum of squared
  input lengths of the requests an instance holds;
- dispatch send load, which grows with the input token count: the instance sends each token's
  hidden state to its experts, so equal token counts mean equal dispatch traffic.
Each is estimated as the instance's last report plus what this router sent since (ledger.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.balance.ledger import DispatchLedger, estimate
from services.balance.scoring import active_only, check_weights, pick_lowest
from services.common.states import InstanceState


@dataclass(frozen=True)
class PrefillInstanceLoad:
    instance_id: str
    queued_tokens: int = 0  # input tokens of the requests it holds (queued or running)
    attention_cost: float = 0.0  # sum over those requests of input_len ** 2
    state: InstanceState = InstanceState.SERVING
    acked_seq: int | None = None  # highest dispatch seq from this router the figures include

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("instance_id must be non-empty")
        object.__setattr__(self, "state", InstanceState(self.state))
        if self.queued_tokens < 0 or self.attention_cost < 0:
            raise ValueError(f"{self.instance_id}: reported loads must be >= 0")
        if self.acked_seq is not None and self.acked_seq < 0:
            raise ValueError(f"{self.instance_id}: acked_seq must be >= 0")


@dataclass(frozen=True)
class PrefillBalancerConfig:
    attention_weight: float = 1.0
    token_weight: float = 1.0

    def __post_init__(self) -> None:
        check_weights(attention_weight=self.attention_weight, token_weight=self.token_weight)


class PrefillBalancer:
    """Pure bookkeeping: the router calls choose, then on_dispatched, later on_finished."""

    def __init__(self, config: PrefillBalancerConfig | None = None) -> None:
        self.config = config or PrefillBalancerConfig()
        self._ledger = DispatchLedger(dimensions=2)  # (attention cost, tokens)

    def estimated_loads(
        self, instances: Sequence[PrefillInstanceLoad]
    ) -> dict[str, tuple[float, float]]:
        """instance id -> (attention cost, tokens): report plus not-yet-reported dispatches."""
        return {
            i.instance_id: estimate(
                self._ledger,
                i.instance_id,
                i.acked_seq,
                (float(i.attention_cost), float(i.queued_tokens)),
            )
            for i in instances
        }

    def choose(self, instances: Sequence[PrefillInstanceLoad], prompt_len: int,
               cached: Mapping[str, int] | None = None) -> str:
        """The active instance that keeps the worst normalised load lowest, counting on each
        its own work for this prompt: an instance whose prefix cache holds the first `cached`
        tokens computes only the rest (prompt_len - cached tokens, attention prompt_len**2 -
        cached**2), so a long cached prefix wins unless that instance is loaded enough to
        lose it (SGLang's cache-aware routing and llm-d's prefix scorer weigh the same two)."""
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        active = active_only(instances)
        loads = self.estimated_loads(active)
        # A prompt cached whole still computes its last token (its logits give token 0).
        hits = {i.instance_id: min(max((cached or {}).get(i.instance_id, 0), 0), prompt_len - 1)
                for i in active}
        # Fair share per dimension after this request (counted uncached): the mean over active
        # instances; one scale for every candidate, so their figures compare.
        fair_cost = (sum(a for a, _ in loads.values()) + float(prompt_len) ** 2) / len(active)
        fair_tokens = (sum(t for _, t in loads.values()) + prompt_len) / len(active)
        ids = [i.instance_id for i in active]
        ratios = [((loads[i][0] + float(prompt_len) ** 2 - float(hits[i]) ** 2) / fair_cost,
                   (loads[i][1] + prompt_len - hits[i]) / fair_tokens) for i in ids]
        weights = (self.config.attention_weight, self.config.token_weight)
        return pick_lowest(ids, ratios, weights)

    def on_dispatched(self, instance_id: str, request_id: str, prompt_len: int) -> int:
        """Record a sent request; returns the dispatch seq the instance should echo."""
        amounts = (float(prompt_len) ** 2, float(prompt_len))
        return self._ledger.record(instance_id, request_id, amounts)

    def on_finished(self, request_id: str) -> None:
        """The request left the instance (prefill done, failed or cancelled)."""
        self._ledger.finish(request_id)

    @property
    def unreported(self) -> int:
        return len(self._ledger)
