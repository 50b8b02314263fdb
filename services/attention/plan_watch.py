"""An attention instance's copy of the scheduler's overlap plan (JetStream KV).

The scheduler owns the plan (micro-batches 1 or 2, split policy, minimum batch tokens) and
keeps it in bucket PLAN_BUCKET, key PLAN_KEY. This follows that key (control.follow_key); a
new version is handed to `apply` (which sets the engine's plan). The engine reads its plan
once at the start of each forward, so a new plan takes effect at a step boundary, never within
a step. A plan this instance does not understand is logged and ignored (the old one stays).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from services.common import subjects
from services.common.control import follow_key, kv_get
from services.engine.microbatch import check_plan_fields
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("plan_watch")


class PlanWatcher:
    def __init__(self, kv, apply: Callable[[control_pb2.OverlapPlan], None],
                 poll_s: float = 0.2) -> None:
        self.kv, self.apply, self.poll_s = kv, apply, poll_s
        self.plan: control_pb2.OverlapPlan | None = None
        self.adopted = 0
        self._task: asyncio.Task | None = None

    def offer(self, plan: control_pb2.OverlapPlan) -> bool:
        """Adopt `plan` unless it is the one in use or not understood; True if handed over."""
        if plan == self.plan:
            return False
        try:
            check_plan_fields(plan)
        except ValueError as exc:
            if self.plan is None or plan.version != self.plan.version:
                log.warning("overlap_plan_ignored", version=plan.version, error=str(exc))
            self.plan = plan
            return False
        self.plan = plan
        self.apply(plan)
        self.adopted += 1
        log.info("overlap_plan_received", version=plan.version, micro_batches=plan.micro_batches,
                 split_policy=plan.split_policy, min_batch_tokens=plan.min_batch_tokens,
                 fixed=plan.fixed)
        return True

    async def start(self) -> PlanWatcher:
        """Read the plan once now (a step soon after start uses it), then follow the key."""
        try:
            plan = await asyncio.wait_for(
                kv_get(self.kv, subjects.PLAN_KEY, control_pb2.OverlapPlan), 5.0)
            if plan is not None:
                self.offer(plan)
        except Exception as exc:  # NATS restarting: the follower keeps trying
            log.warning("overlap_plan_read_failed", error=str(exc))
        self._task = asyncio.create_task(self._follow())
        return self

    async def _follow(self) -> None:
        async for plan in follow_key(self.kv, subjects.PLAN_KEY, control_pb2.OverlapPlan,
                                     self.poll_s):
            self.offer(plan)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
