"""The router's view of prefill and decode instances, built from their heartbeats (pure).

An instance is eligible for new requests while its last heartbeat said SERVING and arrived
within `dead_after_s`. Times are the router's own monotonic clock at receipt (never the
sender's `sent_at`), so clock skew between machines cannot make an instance look alive.
Instances silent for `forget_after_s` are dropped, so the view stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.balance.decode_lb import DecodeInstanceLoad
from services.balance.ledger import InstanceState
from services.balance.prefill_lb import PrefillInstanceLoad

PREFILL = "prefill"
DECODE = "decode"
ROLES = (PREFILL, DECODE)
SERVING = "serving"  # the other states: starting, draining, dead


@dataclass(frozen=True)
class InstanceReport:
    """One heartbeat, in plain values."""

    instance_id: str
    role: str
    endpoint: str
    state: str
    queued_tokens: int = 0
    attention_cost: float = 0.0
    running_requests: int = 0
    kv_blocks_in_use: int = 0
    kv_blocks_total: int = 0


@dataclass(frozen=True)
class Instance:
    report: InstanceReport
    heard_at: float  # monotonic seconds

    @property
    def instance_id(self) -> str:
        return self.report.instance_id

    @property
    def endpoint(self) -> str:
        return self.report.endpoint


class InstanceView:
    def __init__(self, dead_after_s: float, forget_after_s: float | None = None) -> None:
        if not dead_after_s > 0:
            raise ValueError(f"dead_after_s must be > 0, got {dead_after_s}")
        self.dead_after_s = dead_after_s
        self.forget_after_s = forget_after_s if forget_after_s is not None else 20 * dead_after_s
        self._by_id: dict[str, Instance] = {}

    def observe(self, report: InstanceReport, now: float) -> None:
        """Record a heartbeat of a prefill or decode instance; other roles are ignored."""
        if report.role not in ROLES or not report.instance_id:
            return
        self._by_id[report.instance_id] = Instance(report, now)
        self._forget_silent(now)

    def known(self, role: str) -> list[Instance]:
        return sorted((i for i in self._by_id.values() if i.report.role == role),
                      key=lambda i: i.instance_id)

    def eligible(self, role: str, now: float) -> list[Instance]:
        """Instances of `role` that take new requests now, by instance id."""
        return [i for i in self.known(role) if self.is_eligible(i, now)]

    def is_eligible(self, instance: Instance, now: float) -> bool:
        return instance.report.state == SERVING and now - instance.heard_at <= self.dead_after_s

    def get(self, instance_id: str) -> Instance | None:
        return self._by_id.get(instance_id)

    def describe(self, role: str, now: float) -> str:
        """For error messages: '0 of 2 decode instances eligible (d0: draining, d1: silent 3.1s)'."""
        known = self.known(role)
        eligible = [i for i in known if self.is_eligible(i, now)]
        why = [f"{i.instance_id}: {self._why_not(i, now)}" for i in known if i not in eligible]
        tail = f" ({', '.join(why)})" if why else ""
        return f"{len(eligible)} of {len(known)} {role} instances eligible{tail}"

    def _why_not(self, instance: Instance, now: float) -> str:
        if instance.report.state != SERVING:
            return instance.report.state
        return f"silent {now - instance.heard_at:.1f}s"

    def _forget_silent(self, now: float) -> None:
        for instance_id in [k for k, i in self._by_id.items()
                            if now - i.heard_at > self.forget_after_s]:
            del self._by_id[instance_id]


# -- loads for the balancers (only eligible instances are passed, so all are ACTIVE) --------

def prefill_loads(instances: Iterable[Instance]) -> list[PrefillInstanceLoad]:
    # acked_seq stays None: PrefillRequest carries no dispatch sequence number to echo, so the
    # balancer takes max(reported, what this router sent and has not seen finish).
    return [PrefillInstanceLoad(i.instance_id, queued_tokens=i.report.queued_tokens,
                                attention_cost=max(0.0, i.report.attention_cost),
                                state=InstanceState.ACTIVE) for i in instances]


def decode_loads(instances: Iterable[Instance]) -> list[DecodeInstanceLoad]:
    # An instance that does not report its KV capacity counts as one block: it looks full, so
    # it gets requests only when no instance that reports has room.
    return [DecodeInstanceLoad(i.instance_id,
                               kv_blocks_in_use=i.report.kv_blocks_in_use,
                               kv_blocks_total=max(1, i.report.kv_blocks_total),
                               running_requests=i.report.running_requests,
                               state=InstanceState.ACTIVE) for i in instances]
