"""What a router has sent to each instance that the instance's load reports do not show yet.

Reports lag: between two reports an instance may receive many requests, and a balancer that
sees only reports sends all of them to the instance that looked idlest. The ledger remembers
each dispatch under a sequence number. An instance's report carries `acked_seq`, the highest
sequence number from this router that its figures include; entries up to it are dropped. An
instance that does not echo (acked_seq None) keeps the router's entries until on_finished, and
the balancer then takes the larger of reported and router-known load, per dimension.
"""

from __future__ import annotations

from dataclasses import dataclass


class NoEligibleInstance(RuntimeError):
    """No instance is serving: the router should reject or retry the request later."""


@dataclass(frozen=True)
class Dispatch:
    seq: int
    instance_id: str
    request_id: str
    amounts: tuple[float, ...]  # per load dimension, in the balancer's order


class DispatchLedger:
    """Dispatches per instance, in sequence order, with running totals per load dimension."""

    def __init__(self, dimensions: int) -> None:
        self._dimensions = dimensions
        self._next_seq = 1
        self._instance_of: dict[str, str] = {}  # request id -> instance id
        self._sent: dict[str, dict[str, Dispatch]] = {}  # instance -> request id -> dispatch
        self._totals: dict[str, list[float]] = {}

    def record(self, instance_id: str, request_id: str, amounts: tuple[float, ...]) -> int:
        """Remember a dispatch; a re-dispatch of the same request replaces the earlier one."""
        if len(amounts) != self._dimensions:
            raise ValueError(f"expected {self._dimensions} load amounts, got {len(amounts)}")
        self.finish(request_id)
        seq = self._next_seq
        self._next_seq += 1
        self._instance_of[request_id] = instance_id
        self._sent.setdefault(instance_id, {})[request_id] = Dispatch(
            seq, instance_id, request_id, tuple(amounts)
        )
        totals = self._totals.setdefault(instance_id, [0.0] * self._dimensions)
        for k, amount in enumerate(amounts):
            totals[k] += amount
        return seq

    def finish(self, request_id: str) -> None:
        """Forget a request (finished, failed or cancelled); unknown ids are ignored."""
        instance_id = self._instance_of.pop(request_id, None)
        if instance_id is None:
            return
        dispatch = self._sent[instance_id].pop(request_id)
        totals = self._totals[instance_id]
        for k, amount in enumerate(dispatch.amounts):
            totals[k] -= amount
        if not self._sent[instance_id]:
            # Reset exactly: repeated float add/subtract must not leave dust behind.
            del self._sent[instance_id]
            del self._totals[instance_id]

    def acknowledge(self, instance_id: str, acked_seq: int) -> None:
        """Drop the entries an instance's report already includes (dicts keep seq order)."""
        sent = self._sent.get(instance_id, {})
        done = []
        for request_id, dispatch in sent.items():
            if dispatch.seq > acked_seq:
                break
            done.append(request_id)
        for request_id in done:
            self.finish(request_id)

    def outstanding(self, instance_id: str) -> tuple[float, ...]:
        """Summed amounts the ledger holds for an instance, per dimension."""
        return tuple(self._totals.get(instance_id, [0.0] * self._dimensions))

    def __len__(self) -> int:
        return len(self._instance_of)


def estimate(
    ledger: DispatchLedger,
    instance_id: str,
    acked_seq: int | None,
    reported: tuple[float, ...],
) -> tuple[float, ...]:
    """Best estimate of an instance's load per dimension (see the module docstring)."""
    if acked_seq is not None:
        ledger.acknowledge(instance_id, acked_seq)
        pending = ledger.outstanding(instance_id)
        return tuple(r + p for r, p in zip(reported, pending, strict=True))
    known = ledger.outstanding(instance_id)
    return tuple(max(r, k) for r, k in zip(reported, known, strict=True))
