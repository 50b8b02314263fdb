"""Usage records: one per admitted request, appended to the durable JetStream usage stream.

The message id is the request id (Nats-Msg-Id), so a record re-sent after a reconnect is
stored once. Publishing never fails a request: an error is logged and counted.
"""

from __future__ import annotations

import asyncio

import structlog

from services.common import subjects
from services.protos_gen.epserve.v1 import control_pb2
from services.router import metrics

log = structlog.get_logger("router.usage")


class UsagePublisher:
    def __init__(self, js, timeout_s: float = 5.0) -> None:
        self.js, self.timeout_s = js, timeout_s
        self._tasks: set[asyncio.Task] = set()

    async def publish(self, record: control_pb2.UsageRecord) -> None:
        try:
            await self.js.publish(subjects.USAGE_SUBJECT, record.SerializeToString(),
                                  timeout=self.timeout_s,
                                  headers={"Nats-Msg-Id": record.request_id})
        except Exception as exc:
            metrics.USAGE_PUBLISH_ERRORS.inc()
            log.warning("usage_publish_failed", request_id=record.request_id, error=str(exc))

    def publish_later(self, record: control_pb2.UsageRecord) -> None:
        """From a cancelled request's cleanup, where awaiting is not possible."""
        task = asyncio.get_running_loop().create_task(self.publish(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
