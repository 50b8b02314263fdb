"""`epserve serve scheduler`: membership, expert placement and overlap plan, kept in NATS.

Start-up recovers everything from JetStream KV (members, topology, plan), so a restarted
scheduler continues where the old one stopped; only an empty bucket is seeded from the flags.
Heartbeats update membership; a sweep marks silent instances DEAD; the topology names the
expert workers' endpoints once every rank is SERVING on the current placement version.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import grpc
import structlog

from services.balance.eplb import placement_balancedness
from services.balance.placement_proto import table_from, topology_from
from services.common import subjects
from services.common.control import connect
from services.common.health import add_health
from services.common.heartbeat import HeartbeatPublisher
from services.common.logging import configure_logging
from services.common.metrics_http import start_metrics_http
from services.common.shutdown import StopEvent, drain, install_signal_handlers
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
        try:
            self.topology = await self.store.put_topology(topology_from(new, []),
                                                          self.topology.revision)
        except RevisionConflict:
            self.topology = await self.store.get_topology()
            return
        self.rolling_out = new.version
        self.metrics.set_topology(self.topology.message)
        self.metrics.rebalances.inc()
        log.info("rebalance_planned", reason=why, version=new.version,
                 balancedness_before=round(placement_balancedness(table, loads), 4),
                 balancedness_planned=round(placement_balancedness(new, loads), 4))

    async def on_heartbeat(self, msg) -> None:
        hb = control_pb2.Heartbeat()
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
                     role=subjects.ROLE_NAMES.get(hb.role), state=hb.state, endpoint=hb.endpoint,
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
        endpoints = self.membership.expert_endpoints(topo.num_workers, topo.version)
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

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            now = time.time()
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


async def serve(cfg: SchedulerConfig) -> int:
    configure_logging("scheduler", None, cfg.log_level)
    model_cfg = ModelConfig.from_dir(cfg.model)
    metrics = SchedulerMetrics()
    nc = await connect(cfg.nats_url, cfg.instance_id)
    store = await SchedulerStore.open(nc.jetstream())
    members = await store.load_members()
    membership = Membership.restored(members, cfg.dead_after_s, time.time())
    topology, plan = await recover_or_seed(cfg, store, model_cfg)
    log.info("scheduler_recovered", members=len(membership), topology=topology.message.version,
             plan=plan.message.version)
    sched = Scheduler(cfg, store, membership, topology, metrics, model_cfg)
    metrics.set_topology(topology.message)
    metrics.plan_version.set(plan.message.version)
    metrics.set_members(membership.counts())
    sub = await nc.subscribe(subjects.HEARTBEAT_ALL, cb=sched.on_heartbeat)
    load_sub = await nc.subscribe(subjects.EXPERT_LOAD_ALL, cb=sched.on_expert_load)
    sweeper = asyncio.create_task(sched.sweep_forever())
    rebalancer = asyncio.create_task(sched.rebalance_forever()) if sched.policy.enabled else None

    server = grpc.aio.server()
    health = await add_health(server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    if cfg.port_file:
        Path(cfg.port_file).write_text(str(port))
    metrics_port = start_metrics_http(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    heartbeat = HeartbeatPublisher(nc, "scheduler", cfg.instance_id,
                                   f"{cfg.advertise_host or cfg.host}:{port}",
                                   cfg.heartbeat_interval_s)
    heartbeat.state = control_pb2.STATE_SERVING
    heartbeat.start()
    await sched.publish_endpoints()  # members recovered may already complete the topology
    await health.set_serving()
    log.info("scheduler_ready", port=port, metrics_port=metrics_port)
    stop = StopEvent()

    async def on_stop() -> None:
        await heartbeat.set_state(control_pb2.STATE_DRAINING)
        for task in (sweeper, rebalancer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await sub.unsubscribe()
        await load_sub.unsubscribe()
        await heartbeat.stop()
        await drain(health=health, grace_s=cfg.drain_grace_s, server=server, server_grace_s=2.0,
                    nc=nc)
        stop.set("signal")

    install_signal_handlers(asyncio.get_running_loop(), on_stop)
    await stop.wait()
    log.info("scheduler_stopped")
    return 0


if __name__ == "__main__":
    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(SchedulerConfig))))
