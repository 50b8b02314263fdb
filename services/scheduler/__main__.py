"""`epserve serve scheduler`: membership, expert placement and overlap plan, kept in NATS.

Start-up recovers everything from JetStream KV (members, topology, plan), so a restarted
scheduler continues where the old one stopped; only an empty bucket is seeded from the flags.
The control loop is services/scheduler/control_loop.py; this is its service lifecycle.
"""

from __future__ import annotations

import asyncio
import sys
import time

import structlog

from services.common import subjects
from services.common.service import Service
from services.model.config import ModelConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.control_loop import Scheduler, recover_or_seed
from services.scheduler.membership import Membership
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.store import SchedulerStore

log = structlog.get_logger("scheduler")


class SchedulerService(Service):
    role = "scheduler"

    async def setup(self) -> None:
        cfg = self.cfg
        model_cfg = ModelConfig.from_dir(cfg.model)
        metrics = SchedulerMetrics()
        store = await SchedulerStore.open(self.nc.jetstream())
        members = await store.load_members()
        membership = Membership.restored(members, cfg.dead_after_s, time.time())
        topology, plan = await recover_or_seed(cfg, store, model_cfg)
        log.info("scheduler_recovered", members=len(membership),
                 topology=topology.message.version, plan=plan.message.version)
        self.sched = sched = Scheduler(cfg, store, membership, topology, metrics, model_cfg)
        metrics.set_topology(topology.message)
        metrics.plan_version.set(plan.message.version)
        metrics.set_members(membership.counts())
        self.subs = [await self.nc.subscribe(subjects.HEARTBEAT_ALL, cb=sched.on_heartbeat),
                     await self.nc.subscribe(subjects.EXPERT_LOAD_ALL, cb=sched.on_expert_load)]
        self.tasks = [asyncio.create_task(sched.sweep_forever())]
        if sched.policy.enabled:
            self.tasks.append(asyncio.create_task(sched.rebalance_forever()))

    async def until_ready(self) -> None:
        await self.sched.publish_endpoints()  # members recovered may already complete it

    async def stop_core(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for sub in self.subs:
            await sub.unsubscribe()


async def serve(cfg: SchedulerConfig) -> int:
    return await SchedulerService(cfg).run()


if __name__ == "__main__":
    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(SchedulerConfig))))
