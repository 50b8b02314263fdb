"""Usage records and heartbeats folded into the ledger's KV entries, each record exactly once.

The usage stream is read by a durable pull consumer (`epserve-ledger`, AckAll), recreated at
start from the stored cursor + 1: the consumer's own delivery state is not trusted, because
messages delivered to a process that died are redelivered only after ack_wait, behind newer
ones. Records are folded strictly in stream order: a sequence past the next expected one (a
message lost on the way) makes the folder recreate the consumer from the next expected sequence
rather than fold past it; a batch whose writes fail is kept and folded again (after reading the
entries back) until its writes succeed, and only then is the cursor written and the batch
acknowledged. A bucket skips sequences it already holds (economics/tally.py), so folding a
record again after a crash between two writes never counts it twice.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common import subjects
from services.common.states import Role
from services.economics.metering import UsageRecord
from services.economics.tally import Tally
from services.ledger import metrics
from services.ledger.store import CURSOR_KEY, LedgerStore
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("ledger")
RETRY_S = 0.5  # after a failed fetch or write
ACK_WAIT_S = 30.0


class UsageFolder:
    def __init__(self, js, store: LedgerStore, tally: Tally, cursor: int, *,
                 usd_per_device_hour: Decimal, batch: int = 256,
                 fetch_timeout_s: float = 1.0) -> None:
        self.js, self.store, self.tally = js, store, tally
        self.cursor = cursor  # every sequence up to here is folded and written
        self.batch, self.fetch_timeout_s = batch, fetch_timeout_s
        self.usd_per_device_hour = usd_per_device_hour
        self.lock = asyncio.Lock()  # one writer: the fold loop and the occupancy flush
        self._sub = None

    # ---- heartbeats -> device occupancy ------------------------------------------------------
    async def on_heartbeat(self, msg) -> None:
        hb = control_pb2.Heartbeat()
        try:
            hb.ParseFromString(msg.data)
        except Exception:
            return
        role = Role.from_proto(hb.role)
        if role is not None and hb.sent_at > 0:
            self.tally.credit(hb.instance_id, role, hb.started_at or hb.sent_at, hb.sent_at,
                              now=time.time())

    async def flush_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                async with self.lock:
                    await self.write_dirty()
            except Exception as exc:  # NATS away: the same figures are written next time
                log.warning("ledger_flush_failed", error=f"{type(exc).__name__}: {exc}")
                await self._reload()

    # ---- usage records ---------------------------------------------------------------------
    async def run(self) -> None:
        """Until cancelled; every wait inside is bounded."""
        while True:
            if asyncio.current_task().cancelling():  # a cancellation a library swallowed
                raise asyncio.CancelledError
            try:
                if self._sub is None:
                    await self._subscribe()
                msgs = await self._fetch()
                if msgs:
                    await self._fold_batch(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("ledger_fold_failed", error=f"{type(exc).__name__}: {exc}",
                            cursor=self.cursor)
                metrics.FOLD_ERRORS.inc()
                await self._drop_subscription()
                await asyncio.sleep(RETRY_S)

    async def _subscribe(self) -> None:
        info = await asyncio.wait_for(self.js.stream_info(subjects.USAGE_STREAM), 5.0)
        start = max(self.cursor + 1, info.state.first_seq or 1)
        if start > self.cursor + 1:
            log.warning("usage_stream_truncated", cursor=self.cursor, first_seq=start)
        try:
            await asyncio.wait_for(self.js.delete_consumer(subjects.USAGE_STREAM,
                                                           subjects.LEDGER_CONSUMER), 5.0)
        except Exception as exc:
            if type(exc).__name__ != "NotFoundError":
                raise
        config = ConsumerConfig(durable_name=subjects.LEDGER_CONSUMER,
                                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=start, ack_policy=AckPolicy.ALL,
                                ack_wait=ACK_WAIT_S, max_ack_pending=max(self.batch * 4, 1024))
        self._sub = await asyncio.wait_for(self.js.pull_subscribe(
            subjects.USAGE_SUBJECT, durable=subjects.LEDGER_CONSUMER,
            stream=subjects.USAGE_STREAM, config=config), 5.0)
        self._expected, self._fresh = start, True
        log.info("ledger_consuming", start_seq=start)

    async def close(self) -> None:
        """After run() is cancelled: the consumer's subscription (bounded)."""
        await self._drop_subscription()

    async def _drop_subscription(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await asyncio.wait_for(sub.unsubscribe(), 2.0)
            except Exception:
                pass

    async def _fetch(self) -> list:
        try:
            return await self._sub.fetch(self.batch, timeout=self.fetch_timeout_s)
        except Exception as exc:
            # a fetch cancelled because the ledger stops must stop the loop even if the library
            # turned the cancellation into its own error (it must not look like no messages)
            if asyncio.current_task().cancelling():
                raise asyncio.CancelledError from exc
            if type(exc).__name__ == "TimeoutError":
                return []
            raise

    async def _fold_batch(self, msgs: list) -> None:
        # In order and without gaps: a sequence past the expected one means messages were lost
        # on the way; fold what comes before it, then read again from the first missing one.
        ordered, gap = [], None
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            if seq < self._expected:
                continue  # delivered again: folded already
            if seq > self._expected:
                if not self._fresh:
                    gap = seq
                    break
                # The first message of a new consumer is past its start: those sequences are
                # not in the stream any more (deleted), there is nothing to wait for.
                log.warning("usage_stream_gap_skipped", expected=self._expected, got=seq)
                self._expected = seq
            ordered.append((seq, msg))
            self._expected += 1
            self._fresh = False
        if ordered:
            await self._apply(ordered)
            try:
                await asyncio.wait_for(ordered[-1][1].ack(), 2.0)  # AckAll: the whole prefix
            except Exception:
                pass  # delivered again later, and skipped then
        if gap is not None:
            log.warning("usage_stream_gap", expected=self._expected, got=gap)
            await self._drop_subscription()  # resubscribe from cursor + 1 == the expected one

    async def _apply(self, ordered: list) -> None:
        """Fold and write the batch, again and again until its writes succeed."""
        while True:
            async with self.lock:
                folded = sum(self._fold(seq, msg.data) for seq, msg in ordered)
                try:
                    await self.write_dirty(cursor=ordered[-1][0])
                    metrics.RECORDS.labels(outcome="folded").inc(folded)
                    return
                except Exception as exc:
                    log.warning("ledger_write_failed", error=f"{type(exc).__name__}: {exc}",
                                records=len(ordered))
                    metrics.FOLD_ERRORS.inc()
                    await self._reload()
            await asyncio.sleep(RETRY_S)

    def _fold(self, seq: int, data: bytes) -> int:
        msg = control_pb2.UsageRecord()
        try:
            msg.ParseFromString(data)
            record = UsageRecord.from_proto(msg)
        except Exception as exc:  # not a record we can bill: counted, never retried forever
            log.error("usage_record_unreadable", seq=seq, error=str(exc))
            metrics.RECORDS.labels(outcome="unreadable").inc()
            return 0
        try:
            return int(self.tally.add_record(seq, record))
        except ValueError as exc:  # a model the price table does not price
            log.error("usage_record_unpriced", seq=seq, model=record.model,
                      usage_id=record.usage_id, error=str(exc))
            metrics.RECORDS.labels(outcome="unpriced").inc()
            return 0

    async def write_dirty(self, cursor: int | None = None) -> None:
        """Every changed entry, then the cursor. A failure leaves the store behind this
        process: the caller reads it back (_reload) before going on."""
        docs = self.tally.take_dirty()
        try:
            for key, doc in docs.items():
                await self.store.write(key, doc)
        except BaseException:
            self.tally.dirty.update(docs)  # rewriting one that did succeed is harmless
            raise
        if cursor is not None:
            await self.store.write(CURSOR_KEY, {"seq": cursor})
            self.cursor = cursor
        metrics.publish(self.tally, self.cursor, self.usd_per_device_hour)

    async def _reload(self) -> None:
        """Read every entry back: what this process holds may be ahead of the store."""
        try:
            docs = await self.store.read_all()
        except Exception as exc:
            log.warning("ledger_reload_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.store.revisions = {k: v for k, v in self.store.revisions.items() if k in docs}
        self.tally.buckets.clear()
        self.tally.uptimes.clear()
        self.tally.dirty.clear()
        for key, doc in docs.items():
            self.tally.load(key, doc)
        self.cursor = int(docs.get(CURSOR_KEY, {}).get("seq", 0))
