"""The ledger's fold loop against a real nats-server: each usage record counted exactly once
when KV writes fail, when the folding process dies between two writes, and when NATS restarts.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.common import control, subjects
from services.economics.files import load_prices
from services.economics.tally import Tally, totals
from services.ledger.folder import UsageFolder
from services.ledger.store import CURSOR_KEY, LedgerStore
from services.local.nats_server import NatsServer
from services.protos_gen.epserve.v1 import control_pb2

pytestmark = pytest.mark.timeout(90)
HOURS = [datetime(2025, 3, 1, h, 10, tzinfo=UTC).timestamp() for h in (9, 10, 17)]


def record(i: int) -> control_pb2.UsageRecord:
    """Records spread over three buckets (one of them off-peak)."""
    return control_pb2.UsageRecord(request_id="same-client-id", usage_id=f"usage-{i}",
                                   model="deepseek-v3", started_at=HOURS[i % 3] + i,
                                   prompt_tokens=10 + i, prompt_cache_miss_tokens=10 + i,
                                   completion_tokens=i)


async def publish(js, first: int, n: int) -> None:
    for i in range(first, first + n):
        msg = record(i)
        await js.publish(subjects.USAGE_SUBJECT, msg.SerializeToString(),
                         headers={"Nats-Msg-Id": msg.usage_id})


class FailingStore(LedgerStore):
    """Fails chosen writes (by their ordinal), the way a NATS timeout would."""

    def __init__(self, kv, fail_at: set[int]) -> None:
        super().__init__(kv)
        self.fail_at, self.writes = fail_at, 0

    async def write(self, key, doc) -> None:
        self.writes += 1
        if self.writes in self.fail_at:
            raise TimeoutError(f"injected failure of write {self.writes} ({key})")
        await super().write(key, doc)


async def folder_on(js, store: LedgerStore, batch: int = 7) -> UsageFolder:
    """A folder as a fresh ledger process builds it: everything read back from the store."""
    tally = Tally(load_prices(None))
    docs = await store.read_all()
    for key, doc in docs.items():
        tally.load(key, doc)
    return UsageFolder(js, store, tally, int(docs.get(CURSOR_KEY, {}).get("seq", 0)),
                       usd_per_device_hour=2, batch=batch, fetch_timeout_s=0.2)


async def run_until(folder: UsageFolder, cursor: int, deadline_s: float = 30.0) -> None:
    task = asyncio.create_task(folder.run())
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while folder.cursor < cursor:
            assert loop.time() < end, f"cursor {folder.cursor}, wanted {cursor}"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def stored_totals(js):
    tally = Tally(load_prices(None))
    for key, doc in (await LedgerStore(await js.key_value(subjects.LEDGER_BUCKET)).read_all()
                     ).items():
        tally.load(key, doc)
    return totals(tally)


def expected(n: int):
    return (n, sum(10 + i for i in range(n)), sum(range(n)))


def summary(t) -> tuple[int, int, int]:
    (counts,) = t.tokens_by_model.values()
    return t.records, counts.input_cache_miss, counts.output


@pytest.fixture
async def nats_js(tmp_path):
    server = NatsServer(store_dir=tmp_path / "js").start()
    nc = await control.connect(server.url, "test")
    js = nc.jetstream()
    await control.ensure_usage_stream(js)
    yield server, js
    await nc.close()
    server.stop()


async def test_failed_writes_are_retried_without_double_counting(nats_js):
    _, js = nats_js
    await publish(js, 0, 40)
    kv = await control.kv_bucket(js, subjects.LEDGER_BUCKET)
    store = FailingStore(kv, fail_at={2, 5, 6, 11})
    await run_until(await folder_on(js, store), 40)
    assert summary(await stored_totals(js)) == expected(40)


async def test_a_folder_that_dies_between_writes_is_resumed_exactly(nats_js):
    """The first process writes some buckets of a batch but not the cursor, then dies; the next
    one reads from the cursor again and skips what those buckets already hold."""
    _, js = nats_js
    await publish(js, 0, 30)
    kv = await control.kv_bucket(js, subjects.LEDGER_BUCKET)
    for crash_after in (1, 2, 5):  # writes that succeed before the process "dies"
        store = FailingStore(kv, fail_at=set(range(crash_after + 1, 10_000)))
        folder = await folder_on(js, store)
        task = asyncio.create_task(folder.run())
        await asyncio.sleep(1.0)  # it folds, writes, fails; this process is gone now
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publish(js, 30 + crash_after * 10, 10)
    await run_until(await folder_on(js, LedgerStore(kv)), 60)
    t = await stored_totals(js)
    ids = list(range(30)) + [i for c in (1, 2, 5) for i in range(30 + c * 10, 40 + c * 10)]
    assert t.records == len(ids) == 60
    (counts,) = t.tokens_by_model.values()
    assert counts.output == sum(ids) and counts.input_cache_miss == sum(10 + i for i in ids)


async def test_nats_restarting_mid_stream_loses_nothing(nats_js):
    server, js = nats_js
    kv = await control.kv_bucket(js, subjects.LEDGER_BUCKET)
    folder = await folder_on(js, LedgerStore(kv, timeout_s=1.0))
    task = asyncio.create_task(folder.run())
    try:
        await publish(js, 0, 20)
        server.restart()
        await asyncio.sleep(1.0)
        for _ in range(50):  # the client reconnects; JetStream may need a moment
            try:
                await publish(js, 20, 20)
                break
            except Exception:
                await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while folder.cursor < 40:
            assert loop.time() < end, f"cursor {folder.cursor}"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert summary(await stored_totals(js)) == expected(40)
