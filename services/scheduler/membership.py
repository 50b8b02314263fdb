"""Cluster membership from heartbeats: who is alive, in which role, state and placement (pure).

No I/O and no clock of its own: every call takes `now` (unix seconds), so tests drive time.
The records are the control-plane `Member` protos themselves, because they are exactly what the
scheduler stores in the members KV bucket and what recovery reads back; no other layer converts.

The dead rule: an instance not heard from for more than `dead_after_s` (= missed heartbeats x
interval) is marked DEAD by `sweep`. A later heartbeat from the same instance id brings it back.
After a restore (scheduler restart) every live member gets a fresh window, since the scheduler
cannot know what it missed while it was down.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from services.protos_gen.epserve.v1 import control_pb2

# JetStream KV key characters: an instance id is a key of the members bucket.
INSTANCE_ID_PATTERN = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
REPORTABLE_STATES = (control_pb2.STATE_STARTING, control_pb2.STATE_SERVING,
                     control_pb2.STATE_DRAINING)
KNOWN_ROLES = (control_pb2.ROLE_ROUTER, control_pb2.ROLE_SCHEDULER, control_pb2.ROLE_PREFILL,
               control_pb2.ROLE_DECODE, control_pb2.ROLE_EXPERT_WORKER, control_pb2.ROLE_LEDGER)


class HeartbeatRejected(ValueError):
    """A heartbeat that cannot describe a member (bad id, role or state)."""


def _identity(hb: control_pb2.Heartbeat) -> tuple:
    """What makes a heartbeat a membership change when it differs (load figures do not)."""
    return (hb.role, hb.endpoint, hb.rank, hb.placement_version, hb.metrics_endpoint)


class Membership:
    def __init__(self, dead_after_s: float) -> None:
        if dead_after_s <= 0:
            raise ValueError(f"dead_after_s must be > 0, got {dead_after_s}")
        self.dead_after_s = dead_after_s
        self._members: dict[str, control_pb2.Member] = {}
        # When the scheduler last heard of each member: the liveness clock. Equal to
        # member.last_seen except after a restore, which restarts every live member's window.
        self._heard_at: dict[str, float] = {}

    @classmethod
    def restored(cls, members: Iterable[control_pb2.Member], dead_after_s: float,
                 now: float) -> Membership:
        """Membership rebuilt from stored records; live members get a fresh window from `now`."""
        membership = cls(dead_after_s)
        for record in members:
            instance_id = record.last.instance_id
            if not INSTANCE_ID_PATTERN.match(instance_id):
                continue  # not a record this scheduler could have written
            membership._members[instance_id] = _copy(record)
            alive = record.state != control_pb2.STATE_DEAD
            membership._heard_at[instance_id] = max(now, record.last_seen) if alive else \
                record.last_seen
        return membership

    # -- updates -----------------------------------------------------------------------------

    def observe(self, hb: control_pb2.Heartbeat, now: float) -> bool:
        """Records a heartbeat; True when membership changed (new, revived, new state/endpoint,
        rank or placement version). Raises HeartbeatRejected for a malformed heartbeat."""
        _check(hb)
        state = hb.state or control_pb2.STATE_STARTING
        previous = self._members.get(hb.instance_id)
        self._heard_at[hb.instance_id] = now
        if previous is None or previous.state == control_pb2.STATE_DEAD:
            # A new life: first_seen restarts, so it tells how long this incarnation has lived.
            self._members[hb.instance_id] = control_pb2.Member(
                last=hb, state=state, first_seen=now, last_seen=now)
            return True
        changed = previous.state != state or _identity(previous.last) != _identity(hb)
        previous.last.CopyFrom(hb)
        previous.state = state
        previous.last_seen = now
        return changed

    def restart_windows(self, now: float) -> None:
        """Every live member's liveness window starts again at `now` (after a control-plane
        outage, as after a restore: what was missed meanwhile says nothing)."""
        for instance_id, member in self._members.items():
            if member.state != control_pb2.STATE_DEAD:
                self._heard_at[instance_id] = max(now, self._heard_at[instance_id])

    def sweep(self, now: float) -> list[str]:
        """Marks DEAD every member silent for more than `dead_after_s`; returns their ids."""
        newly_dead = []
        for instance_id, member in sorted(self._members.items()):
            if member.state == control_pb2.STATE_DEAD:
                continue
            if now - self._heard_at[instance_id] > self.dead_after_s:
                member.state = control_pb2.STATE_DEAD
                newly_dead.append(instance_id)
        return newly_dead

    def forget_dead(self, now: float, older_than_s: float) -> list[str]:
        """Drops DEAD members last seen more than `older_than_s` ago; returns their ids."""
        gone = [i for i, m in sorted(self._members.items())
                if m.state == control_pb2.STATE_DEAD and now - m.last_seen > older_than_s]
        for instance_id in gone:
            del self._members[instance_id]
            del self._heard_at[instance_id]
        return gone

    # -- queries -----------------------------------------------------------------------------

    def get(self, instance_id: str) -> control_pb2.Member | None:
        member = self._members.get(instance_id)
        return None if member is None else _copy(member)

    def heard_at(self, instance_id: str) -> float | None:
        return self._heard_at.get(instance_id)

    def members(self, role: int | None = None, state: int | None = None
                ) -> list[control_pb2.Member]:
        """Copies of the members with that role and/or state, ordered by instance id."""
        return [_copy(m) for _, m in sorted(self._members.items())
                if (role is None or m.last.role == role) and (state is None or m.state == state)]

    def counts(self) -> dict[tuple[int, int], int]:
        """{(role, state): number of members}."""
        return dict(Counter((m.last.role, m.state) for m in self._members.values()))

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._members

    def expert_endpoints(self, num_workers: int, placement_version: int,
                         lost: frozenset[int] = frozenset()) -> list[str] | None:
        """gRPC endpoints of ranks 0..num_workers-1, when every rank has a SERVING expert worker
        that runs `placement_version`; else None. Two instances claiming one rank (a replaced
        pod whose old copy still beats): the one heard from most recently wins. A rank in
        `lost` (placed around) needs no serving worker: its last known endpoint stands in."""
        best: dict[int, tuple[float, str, str]] = {}
        last_known: dict[int, tuple[float, str]] = {}
        for instance_id, m in self._members.items():
            hb = m.last
            if hb.role != control_pb2.ROLE_EXPERT_WORKER or hb.rank >= num_workers \
                    or not hb.endpoint:
                continue
            heard = self._heard_at[instance_id]
            if hb.rank not in last_known or heard > last_known[hb.rank][0]:
                last_known[hb.rank] = (heard, hb.endpoint)
            if m.state != control_pb2.STATE_SERVING or hb.placement_version != placement_version:
                continue
            candidate = (heard, instance_id, hb.endpoint)
            if hb.rank not in best or candidate > best[hb.rank]:
                best[hb.rank] = candidate
        endpoints = []
        for rank in range(num_workers):
            if rank in best:
                endpoints.append(best[rank][2])
            elif rank in lost and rank in last_known:
                endpoints.append(last_known[rank][1])
            else:
                return None
        return endpoints

    def lost_ranks(self, num_workers: int, placement_version: int, now: float,
                   grace_s: float) -> set[int]:
        """Ranks whose expert worker died (DEAD, last heard more than `grace_s` ago) and that
        no SERVING worker on `placement_version` has taken over. A rank that never registered
        (still loading) is never lost."""
        workers = [m for m in self._members.values()
                   if m.last.role == control_pb2.ROLE_EXPERT_WORKER and m.last.rank < num_workers]
        serving = {m.last.rank for m in workers if m.state == control_pb2.STATE_SERVING
                   and m.last.placement_version == placement_version}
        return {m.last.rank for m in workers if m.state == control_pb2.STATE_DEAD
                and now - m.last_seen >= grace_s} - serving


def _check(hb: control_pb2.Heartbeat) -> None:
    if not INSTANCE_ID_PATTERN.match(hb.instance_id):
        raise HeartbeatRejected(f"instance id {hb.instance_id!r} is not a valid KV key")
    if hb.role not in KNOWN_ROLES:
        raise HeartbeatRejected(f"{hb.instance_id}: unknown role {hb.role}")
    if hb.state and hb.state not in REPORTABLE_STATES:
        raise HeartbeatRejected(f"{hb.instance_id}: an instance cannot report state {hb.state}")


def _copy(member: control_pb2.Member) -> control_pb2.Member:
    out = control_pb2.Member()
    out.CopyFrom(member)
    return out
