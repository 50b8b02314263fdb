"""Prometheus metrics of the scheduler.

Gauges are set from the event loop after each change (not computed at scrape time), so the
scrape thread never iterates state that the loop is mutating.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from services.common.states import InstanceState, Role
from services.protos_gen.epserve.v1 import control_pb2


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.members = Gauge("epserve_scheduler_members", "members by role and state",
                             ["role", "state"], registry=registry)
        self.topology_version = Gauge("epserve_scheduler_topology_version",
                                      "placement version of the published topology",
                                      registry=registry)
        self.topology_ready = Gauge("epserve_scheduler_topology_ready",
                                    "1 when the topology names every expert worker's endpoint",
                                    registry=registry)
        self.plan_version = Gauge("epserve_scheduler_plan_version", "overlap plan version",
                                  registry=registry)
        self.heartbeats = Counter("epserve_scheduler_heartbeats", "heartbeats received",
                                  ["role"], registry=registry)
        self.heartbeats_rejected = Counter("epserve_scheduler_heartbeats_rejected",
                                           "malformed heartbeats ignored", registry=registry)
        self.members_dead = Counter("epserve_scheduler_members_dead",
                                    "members marked DEAD after missed heartbeats",
                                    registry=registry)
        self.rebalances = Counter("epserve_scheduler_rebalances", "placement re-plans published",
                                  registry=registry)
        self.kv_write_errors = Counter("epserve_scheduler_kv_write_errors",
                                       "failed KV writes (retried)", registry=registry)

    def set_members(self, counts: dict[tuple[int, int], int]) -> None:
        """Every (role, state) pair is exported, zeros included, so a series never goes stale."""
        for role in Role:
            for state in InstanceState:
                self.members.labels(role=role, state=state).set(
                    counts.get((role.proto, state.proto), 0))

    def set_topology(self, topo: control_pb2.Topology) -> None:
        self.topology_version.set(topo.version)
        self.topology_ready.set(1 if topo.worker_endpoints and all(topo.worker_endpoints) else 0)

    def heartbeat(self, role: int) -> None:
        self.heartbeats.labels(role=Role.from_proto(role) or "unknown").inc()
