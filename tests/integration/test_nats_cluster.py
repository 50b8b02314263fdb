"""A local 3-node JetStream cluster (NatsCluster, real nats-server processes) and the control
helpers over it: a comma-separated URL list, replicated KV buckets and the usage stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request

import pytest
from nats.js.api import StorageType

from services.common import control, subjects
from services.local.nats_cluster import NatsCluster
from tests.pids import pid_alive

pytestmark = pytest.mark.timeout(60)


async def until(what, deadline_s: float, interval_s: float = 0.05):
    """`await what()` until it returns without raising; its result. The last error after
    `deadline_s` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            return await what()
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(interval_s)


def test_cluster_nodes_have_routes_fsync_and_a_meta_leader():
    cluster = NatsCluster(3)
    try:
        cluster.start()
        assert len(cluster.nodes) == 3
        assert cluster.urls == cluster.url == ",".join(n.url for n in cluster.nodes)
        assert control.nats_servers(cluster.urls) == [n.url for n in cluster.nodes]
        assert len({n.port for n in cluster.nodes}) == 3
        assert len({n.store_dir for n in cluster.nodes}) == 3
        assert cluster.meta_leader() in {n.server_name for n in cluster.nodes}
        for node in cluster.nodes:
            assert node.url.startswith("nats://127.0.0.1:") and pid_alive(node.pid)
            conf = node.config_path.read_text()
            assert "sync_interval: always" in conf and "cluster {" in conf
            with urllib.request.urlopen(f"{node.monitor_url}/jsz", timeout=5) as reply:
                jsz = json.loads(reply.read())
            assert jsz["config"]["sync_always"] is True
            assert jsz["meta_cluster"]["cluster_size"] == 3
        pids = [n.pid for n in cluster.nodes]
    finally:
        cluster.stop()
    assert not any(pid_alive(p) for p in pids)


def test_single_node_cluster_is_one_server():
    with NatsCluster(1) as cluster:
        [node] = cluster.nodes
        assert cluster.urls == node.url and node.cluster_name is None
        assert "cluster {" not in node.config_path.read_text()
        pid = node.pid
    assert not pid_alive(pid)


async def test_replicated_bucket_survives_sigkill_of_a_node(monkeypatch):
    monkeypatch.setenv(control.REPLICAS_ENV, "3")
    cluster = NatsCluster(3)
    nc = None
    try:
        cluster.start()
        nc = await control.connect(cluster.urls, "test-cluster", timeout=2.0)
        js = nc.jetstream(timeout=1.0)
        kv = await control.kv_bucket(js, "members")  # replicas from the environment
        assert (await js.stream_info("KV_members")).config.num_replicas == 3
        await control.ensure_usage_stream(js)
        usage = await js.stream_info(subjects.USAGE_STREAM)
        assert usage.config.num_replicas == 3 and usage.config.duplicate_window == 600.0
        assert usage.config.storage in (StorageType.FILE, "file")
        await kv.put("prefill-0", b"alive")

        # kill the node this client talks to: it must fail over to another one
        victim = next(n for n in cluster.nodes if n.port == nc.connected_url.port)
        os.kill(victim.pid, signal.SIGKILL)
        await until(lambda: kv.put("prefill-0", b"still"), 15.0)
        assert (await until(lambda: kv.get("prefill-0"), 5.0)).value == b"still"
        assert nc.connected_url.port != victim.port

        victim.restart()  # same ports, same store: it rejoins and catches up
        cluster.wait_ready(15.0)
        fresh = await control.connect(victim.url, "test-rejoined", timeout=2.0)
        try:
            kv2 = await control.kv_bucket(fresh.jetstream(timeout=1.0), "members")
            entry = await until(lambda: kv2.get("prefill-0"), 15.0)
            assert entry.value == b"still"
        finally:
            await fresh.close()
    finally:
        if nc is not None:
            await nc.close()
        cluster.stop()


def test_replicas_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(control.REPLICAS_ENV, raising=False)
    assert control.default_replicas() == 1
    assert control.default_replicas(3) == 3
    monkeypatch.setenv(control.REPLICAS_ENV, "3")
    assert control.default_replicas() == 3 and control.default_replicas(1) == 1
    for bad in ("x", "0", "9"):
        monkeypatch.setenv(control.REPLICAS_ENV, bad)
        with pytest.raises(ValueError):
            control.default_replicas()
    assert control.nats_servers(" nats://a:1, nats://b:2 ,") == ["nats://a:1", "nats://b:2"]
    with pytest.raises(ValueError):
        control.nats_servers(" , ")
