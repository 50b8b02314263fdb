"""Periodic heartbeats on NATS: identity, endpoint, state and load of one instance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from services.common import subjects
from services.common.states import Role
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("heartbeat")


class HeartbeatPublisher:
    def __init__(self, nc, role: str, instance_id: str, endpoint: str, interval_s: float = 0.5,
                 load: Callable[[], control_pb2.InstanceLoad] | None = None, rank: int = 0,
                 placement_version: Callable[[], int] | None = None,
                 metrics_endpoint: str = "", started_at: float | None = None) -> None:
        self.nc, self.role, self.instance_id = nc, role, instance_id
        self.endpoint, self.interval_s, self.rank = endpoint, interval_s, rank
        self.load = load
        self.placement_version = placement_version
        self.metrics_endpoint = metrics_endpoint
        # When this process began to hold its device: the ledger prices occupancy from it.
        self.started_at = time.time() if started_at is None else started_at
        self.state = control_pb2.STATE_STARTING
        self._task: asyncio.Task | None = None

    def message(self) -> control_pb2.Heartbeat:
        hb = control_pb2.Heartbeat(
            instance_id=self.instance_id, role=Role(self.role).proto, endpoint=self.endpoint,
            state=self.state, rank=self.rank, sent_at=time.time(),
            metrics_endpoint=self.metrics_endpoint, started_at=self.started_at)
        if self.placement_version is not None:
            hb.placement_version = self.placement_version()
        if self.load is not None:
            hb.load.CopyFrom(self.load())
        return hb

    async def publish_now(self) -> None:
        try:
            await self.nc.publish(subjects.heartbeat(self.role, self.instance_id),
                                  self.message().SerializeToString())
        except Exception as exc:  # NATS down: keep beating, it reconnects
            log.warning("heartbeat_failed", error=str(exc))

    async def _run(self) -> None:
        while True:
            await self.publish_now()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def set_state(self, state: int) -> None:
        self.state = state
        await self.publish_now()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
