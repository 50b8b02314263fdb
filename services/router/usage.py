"""Usage records: one per admitted request, appended to the durable JetStream usage stream.

A record is never dropped because NATS is away. The message id (Nats-Msg-Id) is the record's
server-assigned `usage_id` (its `request_id` when that is empty), so a record sent twice (after
a reconnect, or from the spool) is stored once within the stream's duplicate window. A publish
that fails (NATS down, a timeout, no ack) appends the record to an on-disk spool
(services/router/usage_spool.py: fsync'd, bounded, survives a router restart); a background
task re-publishes spooled records once NATS answers, oldest first, and removes each only after
JetStream acknowledged it. While NATS is known to be away new records go straight to the spool
(no request waits `timeout_s` for a dead server); the background task probes with the oldest
spooled record every `retry_s`. Publishing never fails a request.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge

from services.common import subjects
from services.protos_gen.epserve.v1 import control_pb2
from services.router import metrics
from services.router.usage_spool import UsageSpool

log = structlog.get_logger("router.usage")

USAGE_SPOOLED = Gauge("epserve_router_usage_spooled",
                      "usage records in the on-disk spool, waiting for JetStream")
USAGE_SPOOL_DROPPED = Counter("epserve_router_usage_spool_dropped_total",
                              "usage records lost from the spool (full: the oldest; "
                              "write_error: the disk refused it)", ["reason"])
USAGE_REPUBLISHED = Counter("epserve_router_usage_republished_total",
                            "spooled usage records JetStream acknowledged later")

BATCH = 64  # spooled records published concurrently per round once NATS answers
IDLE_WAIT_S = 1.0  # the background task's longest sleep with nothing spooled


class UsagePublisher:
    def __init__(self, js, timeout_s: float = 5.0, spool_dir: str | Path | None = None,
                 max_spooled: int = 100_000, retry_s: float = 0.5) -> None:
        if timeout_s <= 0 or retry_s <= 0:
            raise ValueError("timeout_s and retry_s must be > 0")
        self.js, self.timeout_s, self.retry_s = js, timeout_s, retry_s
        self._own_dir = spool_dir is None
        self.spool_dir = Path(tempfile.mkdtemp(prefix="epserve-usage-spool-")
                              if spool_dir is None else spool_dir)
        self.spool = UsageSpool(self.spool_dir, max_spooled)
        if self.spool.dropped_at_load:
            USAGE_SPOOL_DROPPED.labels(reason="full").inc(self.spool.dropped_at_load)
        USAGE_SPOOLED.set(len(self.spool))
        self._tasks: set[asyncio.Task] = set()
        self._drainer: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._nats_ok = True  # False from a failed publish until a spooled record is acked

    # -- the public API --------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the background task that re-publishes spooled records (records a previous
        process left in the spool dir included). `publish` also starts it when needed."""
        self._ensure_drainer()

    async def publish(self, record: control_pb2.UsageRecord) -> bool:
        """True when JetStream acknowledged the record now; False when it was spooled (it is
        published later). Never raises for NATS trouble."""
        self._ensure_drainer()
        record = with_usage_id(record)
        data = record.SerializeToString()
        if self._nats_ok:
            try:
                await self._publish_once(data, msg_id(record), self.timeout_s)
                return True
            except Exception as exc:
                metrics.USAGE_PUBLISH_ERRORS.inc()
                self._nats_ok = False
                log.warning("usage_publish_failed", request_id=record.request_id,
                            usage_id=record.usage_id, error=f"{type(exc).__name__}: {exc}")
        await self._spool(data, record)
        return False

    def publish_later(self, record: control_pb2.UsageRecord) -> None:
        """From a cancelled request's cleanup, where awaiting is not possible."""
        task = asyncio.get_running_loop().create_task(self.publish(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, timeout_s: float | None = None) -> int:
        """Waits for pending publishes, then re-publishes what is spooled, for at most
        `timeout_s` (default: timeout_s + 5) seconds; stops the background task. Returns how
        many records are still spooled (they stay on disk for the next process)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s + 5.0 if timeout_s is None else timeout_s)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(deadline - loop.time(), 0.0))
        await self._stop_drainer(max(deadline - loop.time(), 0.1))
        while len(self.spool) and loop.time() < deadline:
            if not await self._drain_round(min(self.timeout_s, deadline - loop.time())):
                await asyncio.sleep(min(self.retry_s, max(deadline - loop.time(), 0.0)))
        left = len(self.spool)
        if left:
            log.warning("usage_records_left_spooled", records=left, spool=str(self.spool_dir))
        return left

    async def close(self, timeout_s: float | None = None) -> int:
        """`flush`, then closes the spool (a temp spool dir of ours is removed when empty)."""
        left = await self.flush(timeout_s)
        self.spool.close()
        if self._own_dir and not left:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
        return left

    @property
    def spooled(self) -> int:
        return len(self.spool)

    # -- internals -------------------------------------------------------------------------

    async def _publish_once(self, data: bytes, message_id: str, timeout: float) -> None:
        ack = await self.js.publish(subjects.USAGE_SUBJECT, data, timeout=timeout,
                                    headers={"Nats-Msg-Id": message_id})
        if ack is None or not getattr(ack, "stream", None):
            raise RuntimeError(f"no JetStream ack ({ack!r})")

    async def _spool(self, data: bytes, record: control_pb2.UsageRecord) -> None:
        try:
            dropped = await asyncio.to_thread(self.spool.append, data)
        except Exception as exc:  # the disk refused it: the one way a record is lost
            USAGE_SPOOL_DROPPED.labels(reason="write_error").inc()
            log.error("usage_spool_write_failed", request_id=record.request_id,
                      usage_id=record.usage_id, error=str(exc))
            return
        if dropped:
            USAGE_SPOOL_DROPPED.labels(reason="full").inc(dropped)
            log.warning("usage_spool_full_dropped_oldest", dropped=dropped,
                        max_spooled=self.spool.max_records)
        USAGE_SPOOLED.set(len(self.spool))
        if self._wake is not None:
            self._wake.set()

    def _ensure_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._wake = asyncio.Event()
            self._drainer = asyncio.get_running_loop().create_task(self._drain_loop())

    async def _stop_drainer(self, timeout: float) -> None:
        task, self._drainer = self._drainer, None
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)

    async def _drain_loop(self) -> None:
        """Until cancelled: re-publish spooled records; each wait is bounded."""
        while True:
            try:
                if not len(self.spool):
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), IDLE_WAIT_S)
                    except TimeoutError:
                        pass
                    continue
                if not await self._drain_round(self.timeout_s):
                    await asyncio.sleep(self.retry_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or the disk: keep the records, retry later
                log.exception("usage_drain_failed", error=str(exc))
                await asyncio.sleep(self.retry_s)

    async def _drain_round(self, timeout: float) -> bool:
        """Publishes the oldest spooled records (one, as a probe, while NATS is thought away)
        and removes the acknowledged prefix; True when every one was acknowledged."""
        batch = self.spool.peek(BATCH if self._nats_ok else 1)
        if not batch:
            return True
        results = await asyncio.gather(
            *(self._publish_once(data, _spooled_msg_id(data), timeout) for _, data in batch),
            return_exceptions=True)
        acked_upto, acked = None, 0
        for (seq, _data), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                break
            acked_upto, acked = seq, acked + 1
        if acked_upto is not None:
            await asyncio.to_thread(self.spool.ack, acked_upto)
            USAGE_REPUBLISHED.inc(acked)
            USAGE_SPOOLED.set(len(self.spool))
        if acked < len(batch):
            failure = results[acked]
            log.debug("usage_republish_failed", error=f"{type(failure).__name__}: {failure}",
                      spooled=len(self.spool))
            self._nats_ok = False
            return False
        if not self._nats_ok:
            log.info("usage_publishing_resumed", spooled=len(self.spool))
        self._nats_ok = True
        return True


def msg_id(record: control_pb2.UsageRecord) -> str:
    """The JetStream message id of a record: its usage_id, else its request_id."""
    return record.usage_id or record.request_id


def with_usage_id(record: control_pb2.UsageRecord) -> control_pb2.UsageRecord:
    """The record itself when it has an id to de-duplicate on; else a copy with a fresh
    usage_id (so its re-sends from the spool are still stored once)."""
    if msg_id(record):
        return record
    copy = control_pb2.UsageRecord()
    copy.CopyFrom(record)
    copy.usage_id = f"usage-{uuid.uuid4().hex}"
    return copy


def _spooled_msg_id(data: bytes) -> str:
    record = control_pb2.UsageRecord()
    record.ParseFromString(data)
    return msg_id(record)
