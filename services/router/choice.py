"""Which prefill and which decode instance take a request (pure).

Two modes: "load" asks the prefill and decode load balancers (services/balance), which weigh
each instance's last report plus what this router sent since; "rr" is plain round-robin over
the eligible instances in id order. Both skip instances in `avoid` (ones that just failed or
refused this request) unless `avoid` would leave nothing and the caller allows a repeat.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from services.balance.decode_lb import DecodeBalancer, DecodeBalancerConfig
from services.balance.prefill_lb import PrefillBalancer
from services.router.instances import DECODE, PREFILL, Instance, decode_loads, prefill_loads

MODES = ("load", "rr")


class NoInstance(RuntimeError):
    """No eligible instance of a role; the message is for the client (UNAVAILABLE)."""


class InstanceChooser:
    def __init__(self, mode: str = "load", context_tokens: int | None = None) -> None:
        """context_tokens: the model's context, which caps a decode KV reservation."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.prefill_balancer = PrefillBalancer()
        self.decode_balancer = DecodeBalancer(DecodeBalancerConfig(context_tokens=context_tokens))
        self._next = {PREFILL: 0, DECODE: 0}  # round-robin cursors

    def choose_decode(self, eligible: Sequence[Instance], prompt_len: int, max_tokens: int,
                      avoid: Collection[str] = ()) -> Instance:
        """A decode instance not in `avoid` (one that refused this request will refuse again)."""
        candidates = [i for i in eligible if i.instance_id not in avoid]
        if not candidates:
            raise NoInstance(_none_left(DECODE, eligible, avoid))
        if self.mode == "rr":
            return self._round_robin(DECODE, candidates)
        chosen = self.decode_balancer.choose(decode_loads(candidates), prompt_len, max_tokens)
        return _by_id(candidates, chosen)

    def choose_prefill(self, eligible: Sequence[Instance], prompt_len: int,
                       avoid: Collection[str] = (), cached: Mapping[str, int] | None = None
                       ) -> Instance:
        """A prefill instance, preferably not in `avoid`; one in it when it is the only one.
        `cached`: prompt tokens each instance's prefix cache holds (the balancer weighs them)."""
        candidates = [i for i in eligible if i.instance_id not in avoid] or list(eligible)
        if not candidates:
            raise NoInstance(_none_left(PREFILL, eligible, avoid))
        if self.mode == "rr":
            return self._round_robin(PREFILL, candidates)
        chosen = self.prefill_balancer.choose(prefill_loads(candidates), prompt_len, cached)
        return _by_id(candidates, chosen)

    # Ledger bookkeeping (the balancers estimate load between reports from it). Called in
    # both modes, so switching modes never leaves stale entries behind.

    def decode_dispatched(self, instance_id: str, request_id: str, prompt_len: int,
                          max_tokens: int, block_tokens: int | None = None) -> None:
        self.decode_balancer.on_dispatched(instance_id, request_id, prompt_len, max_tokens,
                                           block_tokens)

    def prefill_dispatched(self, instance_id: str, request_id: str, prompt_len: int) -> None:
        self.prefill_balancer.on_dispatched(instance_id, request_id, prompt_len)

    def decode_finished(self, request_id: str) -> None:
        self.decode_balancer.on_finished(request_id)

    def prefill_finished(self, request_id: str) -> None:
        self.prefill_balancer.on_finished(request_id)

    def _round_robin(self, role: str, candidates: Sequence[Instance]) -> Instance:
        chosen = candidates[self._next[role] % len(candidates)]
        self._next[role] += 1
        return chosen


def _by_id(candidates: Sequence[Instance], instance_id: str) -> Instance:
    return next(i for i in candidates if i.instance_id == instance_id)


def _none_left(role: str, eligible: Sequence[Instance], avoid: Collection[str]) -> str:
    if not eligible:
        return f"no {role} instance is serving"
    return f"no other {role} instance to try ({', '.join(sorted(avoid))} refused or failed)"
