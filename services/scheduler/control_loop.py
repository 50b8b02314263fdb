"""The scheduler's control loop: membership from heartbeats, the topology's worker endpoints,
the sweep that marks silent members DEAD, and live rebalancing (plan, roll out). All state
changes happen on the event loop (no locks needed); durable state goes through the store.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from services.balance.eplb import placement_balancedness
from services.balance.lost_workers import covers_without, placement_without
from services.balance.placement_proto import table_from, topology_from
from services.common.states import InstanceState, Role
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import control_pb2
from services.scheduler.config import SchedulerConfig
from services.scheduler.initial_state import (
    check_plan,
    check_topology_fits,
    initial_placement,
    initial_plan,
)
from services.scheduler.membership import HeartbeatRejected, Membership
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.rebalance import LoadWindow, RebalancePolicy, decide, replan
from services.scheduler.store import RevisionConflict, SchedulerStore, Versioned

log = structlog.get_logger("scheduler")


class Scheduler:
    """The control loop; all state changes happen on the event loop (no locks needed)."""

    def __init__(self, cfg: SchedulerConfig, store: SchedulerStore, membership: Membership,
                 topology: Versioned, metrics: SchedulerMetrics, model_cfg: ModelConfig) -> None:
        self.cfg, self.store, self.membership = cfg, store, membership
        self.topology, self.metrics = topology, metrics
        self._written_at: dict[str, float] = {}
        self.window = LoadWindow(cfg.load_window_s, tuple(model_cfg.moe_layer_ids),
                                 model_cfg.n_routed_experts)
        self.policy = RebalancePolicy(
            threshold=cfg.rebalance_threshold, period_s=cfg.rebalance_period_s,
            min_tokens=cfg.rebalance_min_tokens, cooldown_s=cfg.rebalance_cooldown_s,
            num_nodes=cfg.eplb_nodes,
            num_groups=cfg.eplb_groups or max(1, model_cfg.n_group), policy=cfg.eplb_policy)
        self.last_plan_at = 0.0  # the first plan may come as soon as the window is full
        self._last_heartbeat_at = time.time()
        self.rolling_out = 0  # version published without endpoints yet

    async def on_expert_load(self, msg) -> None:
        report = control_pb2.ExpertLoadReport()
        try:
            report.ParseFromString(msg.data)
            self.window.add(report, time.time())
        except Exception as exc:  # ReportRejected or undecodable: never stops the loop
            log.warning("expert_load_rejected", subject=msg.subject, reason=str(exc))

    async def rebalance_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.rebalance_check_s)
            try:
                await self.maybe_rebalance(time.time())
            except Exception as exc:  # a failed plan keeps the current placement
                log.error("rebalance_failed", error=str(exc))

    async def maybe_rebalance(self, now: float) -> None:
        topo = self.topology.message
        if not (topo.worker_endpoints and all(topo.worker_endpoints)):
            return  # a roll-out is in progress: judge the placement once it serves
        if self.rolling_out == topo.version:
            self.rolling_out = 0
            self.window.clear()  # judge the new placement on the traffic it serves
        table = table_from(topo)
        loads = self.window.loads(now)
        why = decide(table, loads, now, self.last_plan_at, self.policy)
        if why is None:
            return
        new = await asyncio.to_thread(replan, table, loads, self.policy)
        self.last_plan_at = now
        if new is None:
            log.info("rebalance_unchanged", reason=why)
            return
        if not await self._roll_out(topology_from(new, [])):
            return
        log.info("rebalance_planned", reason=why, version=new.version,
                 balancedness_before=round(placement_balancedness(table, loads), 4),
                 balancedness_planned=round(placement_balancedness(new, loads), 4))

    async def _roll_out(self, topo: control_pb2.Topology) -> bool:
        """Write a new placement version without endpoints (the workers load it, then the
        endpoints follow); False when another writer won the compare-and-set."""
        try:
            self.topology = await self.store.put_topology(topo, self.topology.revision)
        except RevisionConflict:
            self.topology = await self.store.get_topology()
            return False
        self.rolling_out = topo.version
        self.metrics.set_topology(self.topology.message)
        self.metrics.rebalances.inc()
        return True

    def _control_plane_outage(self, now: float) -> bool:
        """No heartbeat at all (not even this scheduler's own) for dead_after_s: NATS is away,
        and silence says nothing about any one member."""
        return now - self._last_heartbeat_at > self.cfg.dead_after_s

    async def on_heartbeat(self, msg) -> None:
        hb = control_pb2.Heartbeat()
        now = time.time()
        if self._control_plane_outage(now):  # the first beat after an outage: a fresh window
            self.membership.restart_windows(now)
            log.info("control_plane_back", silent_s=round(now - self._last_heartbeat_at, 2))
        self._last_heartbeat_at = now
        try:
            hb.ParseFromString(msg.data)
            changed = self.membership.observe(hb, time.time())
        except (HeartbeatRejected, ValueError, Exception) as exc:  # never stops the loop
            self.metrics.heartbeats_rejected.inc()
            log.warning("heartbeat_rejected", subject=msg.subject, reason=str(exc))
            return
        self.metrics.heartbeat(hb.role)
        now = time.time()
        stale = now - self._written_at.get(hb.instance_id, 0.0) > self.cfg.member_refresh_s
        if changed or stale:
            await self._write_member(hb.instance_id, now)
        if changed:
            log.info("member_changed", instance=hb.instance_id,
                     role=Role.from_proto(hb.role), state=InstanceState.from_proto(hb.state), endpoint=hb.endpoint,
                     rank=hb.rank, placement_version=hb.placement_version)
            self.metrics.set_members(self.membership.counts())
            await self.publish_endpoints()

    async def _write_member(self, instance_id: str, now: float) -> None:
        member = self.membership.get(instance_id)
        if member is None:
            return
        try:
            await self.store.put_member(member)
            self._written_at[instance_id] = now
        except Exception as exc:  # NATS restarting: the next heartbeat retries
            self.metrics.kv_write_errors.inc()
            log.warning("member_write_failed", instance=instance_id, error=str(exc))

    async def publish_endpoints(self) -> None:
        """Fill in (or refresh) the worker endpoints of the current topology when every rank
        is SERVING on its placement version; compare-and-set, so nothing is overwritten."""
        topo = self.topology.message
        endpoints = self.membership.expert_endpoints(topo.num_workers, topo.version,
                                                     frozenset(topo.lost_ranks))
        if endpoints is None or list(topo.worker_endpoints) == endpoints:
            return
        new = control_pb2.Topology()
        new.CopyFrom(topo)
        del new.worker_endpoints[:]
        new.worker_endpoints.extend(endpoints)
        try:
            self.topology = await self.store.put_topology(new, self.topology.revision)
        except RevisionConflict:
            self.topology = await self.store.get_topology()  # someone else wrote: re-read
            log.warning("topology_conflict", version=self.topology.message.version)
            return
        except Exception as exc:
            self.metrics.kv_write_errors.inc()
            log.warning("topology_write_failed", error=str(exc))
            return
        self.metrics.set_topology(new)
        log.info("topology_published", version=new.version, workers=endpoints)

    async def place_around_lost_workers(self, now: float) -> None:
        """An expert worker gone for lost_worker_grace_s (no restart brought it back): when
        some expert had its only replicas there, roll out a placement that covers it on the
        live workers (rolled out as a rebalance is); with replicas left, nothing moves."""
        topo = self.topology.message
        if not (topo.worker_endpoints and all(topo.worker_endpoints)):
            return  # a roll-out is in progress
        lost = frozenset(self.membership.lost_ranks(topo.num_workers, topo.version, now,
                                                    self.cfg.lost_worker_grace_s))
        table = table_from(topo)
        if not lost or covers_without(table, lost | frozenset(topo.lost_ranks)):
            return
        all_lost = lost | frozenset(topo.lost_ranks)
        new = placement_without(table, all_lost, self.window.loads(now))
        if new is None:
            log.error("lost_workers_not_coverable", lost=sorted(all_lost),
                      reason="the live workers have too few redundant slots")
            return
        proposed = topology_from(new, [])
        proposed.lost_ranks.extend(sorted(all_lost))
        if not await self._roll_out(proposed):
            return
        log.warning("placed_around_lost_workers", lost=sorted(all_lost), version=new.version)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            now = time.time()
            if self._control_plane_outage(now):
                continue
            # Silence is measured up to the last heartbeat heard from anyone (this scheduler
            # hears its own every interval): a member is dead only if others were heard after
            # its deadline, so a control plane that just stopped kills no one.
            now = self._last_heartbeat_at
            try:
                await self.place_around_lost_workers(now)
            except Exception as exc:  # the placement in service stays
                log.error("lost_worker_replan_failed", error=str(exc))
            for instance_id in self.membership.sweep(now):
                self.metrics.members_dead.inc()
                log.warning("member_dead", instance=instance_id,
                            silent_s=round(now - self.membership.heard_at(instance_id), 2))
                await self._write_member(instance_id, now)
            if self.cfg.forget_dead_after_s:
                for instance_id in self.membership.forget_dead(now, self.cfg.forget_dead_after_s):
                    try:
                        await self.store.delete_member(instance_id)
                    except Exception as exc:
                        log.warning("member_delete_failed", instance=instance_id, error=str(exc))
            self.metrics.set_members(self.membership.counts())


async def recover_or_seed(cfg: SchedulerConfig, store: SchedulerStore,
                          model_cfg: ModelConfig) -> tuple[Versioned, Versioned]:
    """The stored topology and plan, or the initial ones written when the buckets are empty."""
    topology = await store.get_topology()
    if topology is None:
        table = initial_placement(cfg, model_cfg)
        try:
            topology = await store.put_topology(topology_from(table, []), 0)
            log.info("topology_seeded", version=table.version, workers=table.num_workers)
        except RevisionConflict:
            topology = await store.get_topology()
    else:
        log.info("topology_recovered", version=topology.message.version,
                 workers=topology.message.num_workers)
    check_topology_fits(topology.message, model_cfg)
    plan = await store.get_plan()
    if plan is None:
        try:
            plan = await store.put_plan(initial_plan(cfg), 0)
        except RevisionConflict:
            plan = await store.get_plan()
    check_plan(plan.message)
    return topology, plan


