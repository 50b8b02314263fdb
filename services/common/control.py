"""Control-plane helpers over nats-py: connect, KV buckets, protobuf payloads, topology.

(Topology <-> PlacementTable conversion lives beside the table: services/balance/placement_proto.py.)
"""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from services.common import subjects
from services.protos_gen.epserve.v1 import control_pb2


async def connect(url: str, name: str, timeout: float = 10.0) -> nats.NATS:
    """Connect with reconnects forever (a NATS restart must not kill a service)."""
    return await nats.connect(url, name=name, connect_timeout=timeout,
                              max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                              allow_reconnect=True)


async def kv_bucket(js, bucket: str, history: int = 1):
    """The bucket, created if missing (idempotent: every service may call it)."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(KeyValueConfig(bucket=bucket, history=history))
        except Exception:  # another process created it first
            return await js.key_value(bucket)


async def ensure_usage_stream(js) -> None:
    try:
        await js.stream_info(subjects.USAGE_STREAM)
    except Exception:
        await js.add_stream(StreamConfig(name=subjects.USAGE_STREAM,
                                         subjects=[subjects.USAGE_SUBJECT],
                                         duplicate_window=600.0))


async def kv_get(kv, key: str, message_cls):
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if entry is None or entry.value is None or not entry.value:
        return None
    msg = message_cls()
    msg.ParseFromString(entry.value)
    return msg


async def wait_for_topology(kv, timeout: float, need_endpoints: bool = True,
                            poll_s: float = 0.1) -> control_pb2.Topology:
    """Poll the topology key until it exists (and names every worker, if asked)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        topo = await kv_get(kv, subjects.TOPOLOGY_KEY, control_pb2.Topology)
        if topo is not None and (not need_endpoints or
                                 (topo.worker_endpoints and all(topo.worker_endpoints))):
            return topo
        if loop.time() > deadline:
            raise TimeoutError("no expert topology from the scheduler in time")
        await asyncio.sleep(poll_s)
