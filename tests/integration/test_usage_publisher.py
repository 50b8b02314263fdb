"""UsagePublisher against a real nats-server: records spool while NATS is away and reach the
usage stream exactly once when it is back, from this process or the next one."""

from __future__ import annotations

import asyncio

import pytest

from services.common import control, subjects
from services.local.nats_server import NatsServer
from services.protos_gen.epserve.v1 import control_pb2
from services.router import metrics
from services.router.usage import USAGE_SPOOL_DROPPED, USAGE_SPOOLED, UsagePublisher
from tests.pids import pid_alive

pytestmark = pytest.mark.timeout(60)


def record(i: int, **kw) -> control_pb2.UsageRecord:
    return control_pb2.UsageRecord(request_id=f"client-{i}", usage_id=f"usage-{i}",
                                   model="m", completion_tokens=i, **kw)


async def wait_until(predicate, deadline_s: float, interval_s: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(interval_s)


async def stored(js) -> list[control_pb2.UsageRecord]:
    """Every record in the usage stream, in order."""
    info = await js.stream_info(subjects.USAGE_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(subjects.USAGE_STREAM, seq)
        rec = control_pb2.UsageRecord()
        rec.ParseFromString(msg.data)
        out.append(rec)
    assert len(out) == info.state.messages
    return out


def errors_total() -> float:
    return metrics.USAGE_PUBLISH_ERRORS._value.get()


async def _close(publisher, nc, server) -> None:
    if publisher is not None:
        await publisher.close(timeout_s=0.5)
    if nc is not None:
        await nc.close()
    server.stop()


async def test_spools_while_nats_is_down_and_publishes_once_after(tmp_path):
    server = NatsServer(store_dir=tmp_path / "js")
    nc = publisher = None
    try:
        server.start()
        nc = await control.connect(server.url, "test-usage", timeout=2.0)
        js = nc.jetstream(timeout=1.0)
        await control.ensure_usage_stream(js)
        publisher = UsagePublisher(js, timeout_s=0.5, spool_dir=tmp_path / "spool", retry_s=0.05)
        await publisher.start()
        assert await publisher.publish(record(0)) is True
        assert await publisher.publish(record(0)) is True  # the same record twice: stored once
        assert [r.usage_id for r in await stored(js)] == ["usage-0"]

        errors = errors_total()
        pid = server.pid
        server.stop()  # a clean stop; the given store dir and the port stay
        assert not pid_alive(pid)
        assert await publisher.publish(record(1)) is False  # tried, failed, spooled
        for i in range(2, 6):  # NATS known away: straight to the spool, no wait
            publisher.publish_later(record(i))
        await wait_until(lambda: publisher.spooled == 5, 5.0)
        assert errors_total() == errors + 1
        assert USAGE_SPOOLED._value.get() == 5

        server.start()  # same port, same store: the client reconnects by itself
        await wait_until(lambda: publisher.spooled == 0, 10.0)
        assert await publisher.publish(record(3)) is True  # a re-send after the drain
        got = await stored(js)
        assert sorted(r.usage_id for r in got) == [f"usage-{i}" for i in range(6)]
        assert USAGE_SPOOLED._value.get() == 0
        assert await publisher.flush(timeout_s=2.0) == 0
    finally:
        await _close(publisher, nc, server)


async def test_records_spooled_by_a_previous_router_are_published_by_the_next(tmp_path):
    server = NatsServer(store_dir=tmp_path / "js")
    nc = None
    try:
        server.start()
        nc = await control.connect(server.url, "test-usage-restart", timeout=2.0)
        js = nc.jetstream(timeout=1.0)
        await control.ensure_usage_stream(js)
        server.stop()

        first = UsagePublisher(js, timeout_s=0.3, spool_dir=tmp_path / "spool", retry_s=0.05)
        for i in range(3):
            await first.publish(record(i, finish_reason="stop"))
        assert await first.close(timeout_s=0.3) == 3  # NATS still down: they stay on disk

        server.start()
        second = UsagePublisher(js, timeout_s=1.0, spool_dir=tmp_path / "spool", retry_s=0.05)
        try:
            assert second.spooled == 3
            await second.start()
            await wait_until(lambda: second.spooled == 0, 10.0)
        finally:
            assert await second.close(timeout_s=2.0) == 0
        got = await stored(js)
        assert [r.usage_id for r in got] == ["usage-0", "usage-1", "usage-2"]
        assert {r.finish_reason for r in got} == {"stop"}
    finally:
        if nc is not None:
            await nc.close()
        server.stop()


async def test_full_spool_drops_the_oldest_and_counts_it(tmp_path):
    server = NatsServer(store_dir=tmp_path / "js")
    nc = publisher = None
    try:
        server.start()
        nc = await control.connect(server.url, "test-usage-bound", timeout=2.0)
        js = nc.jetstream(timeout=1.0)
        await control.ensure_usage_stream(js)
        server.stop()
        dropped = USAGE_SPOOL_DROPPED.labels(reason="full")._value.get()
        publisher = UsagePublisher(js, timeout_s=0.3, spool_dir=tmp_path / "spool",
                                   max_spooled=3, retry_s=0.05)
        for i in range(5):
            await publisher.publish(record(i))
        assert publisher.spooled == 3
        assert USAGE_SPOOL_DROPPED.labels(reason="full")._value.get() == dropped + 2

        server.start()
        await wait_until(lambda: publisher.spooled == 0, 10.0)
        ids = [r.usage_id for r in await stored(js)]
        # the 3 spooled ones, once each; a dropped one may still have gone out from the
        # client's reconnect buffer (a publish that timed out, or a probe), never twice
        assert {"usage-2", "usage-3", "usage-4"} <= set(ids) and len(ids) == len(set(ids))
    finally:
        await _close(publisher, nc, server)


async def test_msg_id_falls_back_to_the_request_id(tmp_path):
    with NatsServer() as server:
        nc = await control.connect(server.url, "test-usage-ids", timeout=2.0)
        publisher = UsagePublisher(nc.jetstream(timeout=1.0), timeout_s=1.0)
        try:
            js = nc.jetstream(timeout=1.0)
            await control.ensure_usage_stream(js)
            no_usage_id = control_pb2.UsageRecord(request_id="client-7")
            anonymous = control_pb2.UsageRecord(model="m")
            for rec in (no_usage_id, no_usage_id, anonymous):
                assert await publisher.publish(rec) is True
            got = await stored(js)
            assert len(got) == 2 and got[0].request_id == "client-7" and not got[0].usage_id
            assert got[1].usage_id.startswith("usage-")  # an id of its own, for re-sends
        finally:
            spool_dir = publisher.spool_dir
            assert await publisher.close(timeout_s=1.0) == 0
            assert not spool_dir.exists()  # our own temp dir, empty: removed
            await nc.close()
