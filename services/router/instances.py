"""The router's view of prefill and decode instances, built from their heartbeats (pure).

An instance is eligible for new requests while its last heartbeat said SERVING and arrived
within `dead_after_s`. Times are the router's own monotonic clock at receipt (never the
sender's `sent_at`), so clock skew between machines cannot make an instance look alive.
Instances silent for `forget_after_s` are dropped, so the view stays bounded.

Two refinements for failures:
- **A control-plane outage freezes the view.** The router tells the view of every heartbeat
  it hears on the control plane (`heard`, any role, its own included). When none has come for
  `dead_after_s` (NATS is down, or this router's link to it), silence says nothing about any
  one instance: staleness is measured from the last heartbeat heard, so serving goes on with
  the last known membership.
- **Suspects.** An instance that just failed a call of this router is not chosen again until a
  heartbeat newer than the failure arrives (it came back), or `suspect_s` passes (a heartbeat
  may not come during an outage).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.balance.decode_lb import DecodeInstanceLoad
from services.balance.prefill_lb import PrefillInstanceLoad
from services.common.load import InstanceLoad
from services.common.states import InstanceState, Role

PREFILL = Role.PREFILL
DECODE = Role.DECODE
ROLES = (PREFILL, DECODE)


@dataclass(frozen=True)
class InstanceReport:
    """One heartbeat, in plain values."""

    instance_id: str
    role: str
    endpoint: str
    state: str  # an InstanceState value
    load: InstanceLoad = InstanceLoad()


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
    def __init__(self, dead_after_s: float, forget_after_s: float | None = None,
                 suspect_s: float = 10.0) -> None:
        if not dead_after_s > 0:
            raise ValueError(f"dead_after_s must be > 0, got {dead_after_s}")
        self.dead_after_s = dead_after_s
        self.forget_after_s = forget_after_s if forget_after_s is not None else 20 * dead_after_s
        self.suspect_s = suspect_s
        self._by_id: dict[str, Instance] = {}
        self._suspected_at: dict[str, float] = {}
        self._control_heard_at: float | None = None  # the newest heartbeat of any member

    def heard(self, now: float) -> None:
        """A heartbeat of any member arrived: the control plane works."""
        self._control_heard_at = now

    def _reference(self, now: float) -> float:
        """Silence is measured up to the last heartbeat heard on the control plane (the
        router hears its own every interval), so an outage that just began counts against
        no one; `now` when the router reports none."""
        return now if self._control_heard_at is None else min(now, self._control_heard_at)

    def suspect(self, instance_id: str, now: float) -> None:
        """A call to this instance just failed: skip it until it beats again."""
        self._suspected_at[instance_id] = now

    def outage(self, now: float) -> bool:
        """No member heard for dead_after_s: the view is frozen."""
        return self._control_heard_at is not None \
            and now - self._control_heard_at > self.dead_after_s

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
        return (instance.report.state == InstanceState.SERVING
                and self._reference(now) - instance.heard_at <= self.dead_after_s
                and not self._is_suspect(instance, now))

    def _is_suspect(self, instance: Instance, now: float) -> bool:
        at = self._suspected_at.get(instance.instance_id)
        if at is None:
            return False
        if instance.heard_at > at or now - at > self.suspect_s:
            del self._suspected_at[instance.instance_id]
            return False
        return True

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
        if instance.report.state != InstanceState.SERVING:
            return instance.report.state
        if self._is_suspect(instance, now):
            return "failed a call, not heard since"
        return f"silent {now - instance.heard_at:.1f}s"

    def _forget_silent(self, now: float) -> None:
        now = self._reference(now)
        for instance_id in [k for k, i in self._by_id.items()
                            if now - i.heard_at > self.forget_after_s]:
            del self._by_id[instance_id]
            self._suspected_at.pop(instance_id, None)


# -- loads for the balancers (only eligible instances are passed, so all are ACTIVE) --------

def prefill_loads(instances: Iterable[Instance]) -> list[PrefillInstanceLoad]:
    # acked_seq stays None: PrefillRequest carries no dispatch sequence number to echo, so the
    # balancer takes max(reported, what this router sent and has not seen finish).
    return [PrefillInstanceLoad(i.instance_id, queued_tokens=i.report.load.queued_tokens,
                                attention_cost=max(0.0, i.report.load.attention_cost))
            for i in instances]


def decode_loads(instances: Iterable[Instance]) -> list[DecodeInstanceLoad]:
    # An instance that does not report its KV capacity counts as one block: it looks full, so
    # it gets requests only when no instance that reports has room.
    return [DecodeInstanceLoad(i.instance_id, kv_blocks_in_use=i.report.load.kv_blocks_in_use,
                               kv_blocks_total=max(1, i.report.load.kv_blocks_total),
                               running_requests=i.report.load.running_requests,
                               block_tokens=i.report.load.kv_block_size or None)
            for i in instances]
