"""The scheduler's durable state in JetStream KV: members, topology and overlap plan.

Everything the scheduler knows lives here, so a restarted scheduler rebuilds itself from these
buckets. Topology and plan writes are compare-and-set on the key's revision: two schedulers
racing (a rolling update) cannot silently overwrite each other's version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from services.common import subjects
from services.common.control import ensure_usage_stream, kv_bucket
from services.protos_gen.epserve.v1 import control_pb2

M = TypeVar("M")
RECOVERY_TIMEOUT_S = 10.0


class RevisionConflict(RuntimeError):
    """A compare-and-set write lost: the key changed since it was read."""


@dataclass(frozen=True)
class Versioned(Generic[M]):
    """A stored message with the KV revision it was read or written at."""

    message: M
    revision: int


class SchedulerStore:
    def __init__(self, members_kv, topology_kv, plan_kv) -> None:
        self.members_kv = members_kv
        self.topology_kv = topology_kv
        self.plan_kv = plan_kv

    @classmethod
    async def open(cls, js) -> SchedulerStore:
        """The three buckets (created when missing) and the usage stream."""
        await ensure_usage_stream(js)
        return cls(await kv_bucket(js, subjects.MEMBERS_BUCKET),
                   await kv_bucket(js, subjects.TOPOLOGY_BUCKET),
                   await kv_bucket(js, subjects.PLAN_BUCKET))

    # -- members -------------------------------------------------------------------------------

    async def load_members(self) -> list[control_pb2.Member]:
        """Every member record, read with one watcher (latest value per key, deletes skipped)."""
        watcher = await self.members_kv.watchall(ignore_deletes=True)
        members = []
        try:
            while True:
                entry = await watcher.updates(timeout=RECOVERY_TIMEOUT_S)
                if entry is None:  # the watcher's "caught up" marker
                    break
                if entry.value:
                    member = control_pb2.Member()
                    member.ParseFromString(entry.value)
                    members.append(member)
        finally:
            await watcher.stop()
        return members

    async def put_member(self, member: control_pb2.Member) -> None:
        await self.members_kv.put(member.last.instance_id, member.SerializeToString())

    async def delete_member(self, instance_id: str) -> None:
        await self.members_kv.delete(instance_id)

    # -- topology and plan ---------------------------------------------------------------------

    async def get_topology(self) -> Versioned[control_pb2.Topology] | None:
        return await _get(self.topology_kv, subjects.TOPOLOGY_KEY, control_pb2.Topology)

    async def put_topology(self, topo: control_pb2.Topology, last_revision: int
                           ) -> Versioned[control_pb2.Topology]:
        """Writes `topo` if the key is still at `last_revision` (0: only if absent)."""
        return await _compare_and_set(self.topology_kv, subjects.TOPOLOGY_KEY, topo, last_revision)

    async def get_plan(self) -> Versioned[control_pb2.OverlapPlan] | None:
        return await _get(self.plan_kv, subjects.PLAN_KEY, control_pb2.OverlapPlan)

    async def put_plan(self, plan: control_pb2.OverlapPlan, last_revision: int
                       ) -> Versioned[control_pb2.OverlapPlan]:
        return await _compare_and_set(self.plan_kv, subjects.PLAN_KEY, plan, last_revision)


async def _get(kv, key: str, message_cls: type[M]) -> Versioned[M] | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if entry is None or not entry.value:
        return None
    message = message_cls()
    message.ParseFromString(entry.value)
    return Versioned(message, entry.revision)


async def _compare_and_set(kv, key: str, message, last_revision: int) -> Versioned:
    data = message.SerializeToString()
    try:
        if last_revision == 0:
            revision = await kv.create(key, data)
        else:
            revision = await kv.update(key, data, last=last_revision)
    except KeyWrongLastSequenceError as exc:
        raise RevisionConflict(f"{key} changed since revision {last_revision}") from exc
    return Versioned(message, revision)
