"""Control-plane helpers over nats-py: connect, KV buckets, protobuf payloads, topology.

(Topology <-> PlacementTable conversion lives beside the table: services/balance/placement_proto.py.)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import nats
import nats.errors
import structlog
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from services.common import subjects
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("control")


REPLICAS_ENV = "EPSERVE_NATS_REPLICAS"  # JetStream replicas of every bucket and stream (1)
MAX_REPLICAS = 5  # JetStream's limit


def nats_servers(url: str) -> list[str]:
    """A comma-separated URL list (one URL is a list of one) as nats-py's `servers`."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError(f"no NATS server URL in {url!r}")
    return servers


def default_replicas(replicas: int | None = None) -> int:
    """`replicas`, or $EPSERVE_NATS_REPLICAS when it is None (1 when unset): every service
    calls the helpers below without a count, so one variable makes a deployment's state
    replicated across a JetStream cluster."""
    if replicas is None:
        raw = os.environ.get(REPLICAS_ENV, "").strip() or "1"
        try:
            replicas = int(raw)
        except ValueError:
            raise ValueError(f"{REPLICAS_ENV}={raw!r} is not an integer") from None
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"JetStream replicas must be 1..{MAX_REPLICAS}, got {replicas}")
    return replicas


async def connect(url: str, name: str, timeout: float = 10.0, tls=None) -> nats.NATS:
    """Connect with reconnects forever (a NATS restart must not kill a service). `url` may
    list several servers, comma-separated (the nodes of a cluster): nats-py fails over.
    `tls`: an ssl.SSLContext presenting this service's certificate (mesh_tls.py); the NATS
    server maps it to the role's user and its subject permissions."""
    async def on_error(exc: Exception) -> None:  # one structured line, not a traceback
        log.warning("nats_error", error=f"{type(exc).__name__}: {exc}")

    async def on_disconnected() -> None:
        log.warning("nats_disconnected")

    async def on_reconnected() -> None:
        log.info("nats_reconnected")

    return await nats.connect(servers=nats_servers(url), name=name, connect_timeout=timeout,
                              max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                              allow_reconnect=True, error_cb=on_error,
                              disconnected_cb=on_disconnected, reconnected_cb=on_reconnected,
                              **({"tls": tls} if tls is not None else {}))


async def kv_bucket(js, bucket: str, history: int = 1, replicas: int | None = None):
    """The bucket, created if missing with `replicas` (None: $EPSERVE_NATS_REPLICAS) copies
    (idempotent: every service may call it; an existing bucket is taken as it is)."""
    replicas = default_replicas(replicas)
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(KeyValueConfig(bucket=bucket, history=history,
                                                            replicas=replicas))
        except Exception as exc:  # another process created it first, or a real failure
            try:
                return await js.key_value(bucket)
            except BucketNotFoundError:
                raise exc from None
    _check_replicas(f"KV bucket {bucket}", await _stream_replicas(js, f"KV_{bucket}"), replicas)
    return kv


async def ensure_usage_stream(js, replicas: int | None = None) -> None:
    """The durable usage stream: file storage, `replicas` (None: $EPSERVE_NATS_REPLICAS)
    copies, de-duplication on Nats-Msg-Id over 10 minutes."""
    replicas = default_replicas(replicas)
    try:
        info = await js.stream_info(subjects.USAGE_STREAM)
    except Exception:
        await js.add_stream(StreamConfig(name=subjects.USAGE_STREAM,
                                         subjects=[subjects.USAGE_SUBJECT],
                                         duplicate_window=600.0,
                                         storage=StorageType.FILE,
                                         num_replicas=replicas))
        return
    _check_replicas(f"stream {subjects.USAGE_STREAM}", info.config.num_replicas, replicas)


async def _stream_replicas(js, stream: str) -> int | None:
    try:
        return (await js.stream_info(stream)).config.num_replicas
    except Exception:
        return None


def _check_replicas(what: str, have: int | None, want: int) -> None:
    if have is not None and (have or 1) != want:
        log.warning("nats_replicas_differ", what=what, replicas=have, wanted=want,
                    hint="created earlier with another count; scale it with the nats CLI")


async def kv_get(kv, key: str, message_cls):
    """The key's value parsed as `message_cls`, or None when it is absent or empty."""
    return _parse(await _read(kv, key), message_cls)


async def kv_entries(kv, timeout_s: float = 5.0) -> dict[str, tuple[bytes, int]]:
    """Every non-empty key of a bucket: key -> (value, revision); {} for an empty bucket."""
    try:
        keys = await asyncio.wait_for(kv.keys(), timeout_s)
    except Exception as exc:
        if type(exc).__name__ == "NoKeysError":
            return {}
        raise
    out = {}
    for key in keys:
        entry = await asyncio.wait_for(kv.get(key), timeout_s)
        if entry.value:
            out[key] = (entry.value, entry.revision)
    return out


async def follow_key(kv, key: str, message_cls, resync_s: float = 1.0) -> AsyncIterator:
    """Every new value of `key` (parsed as `message_cls`), the current one first, for ever.

    A JetStream KV watch pushes changes as they happen; every `resync_s` without one the key
    is also read directly, so a watch that died with a NATS restart (it is re-created) cannot
    hide a change for longer than that. NATS being away is never an error here: the follower
    logs, waits `resync_s` and tries again. Equal consecutive values are yielded once.
    """
    last, watcher = None, None
    while True:
        try:
            if watcher is None:
                watcher = await kv.watch(key)
            try:
                entry = await watcher.updates(timeout=resync_s)
                data = entry.value if entry is not None else None
                if entry is None:  # the watch's "caught up" marker: read what is there now
                    data = await _read(kv, key)
            except nats.errors.TimeoutError:
                data = await _read(kv, key)
        except Exception as exc:  # NATS restarting or away: retry, from a fresh watch
            log.debug("kv_follow_failed", key=key, error=str(exc))
            watcher = await _stop(watcher)
            await asyncio.sleep(resync_s)
            continue
        msg = _parse(data, message_cls)
        if msg is not None and msg != last:
            last = msg
            yield msg


async def _read(kv, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return entry.value if entry is not None else None


def _parse(data: bytes | None, message_cls):
    if not data:
        return None
    msg = message_cls()
    msg.ParseFromString(data)
    return msg


async def _stop(watcher) -> None:
    if watcher is not None:
        try:
            await watcher.stop()
        except Exception as exc:
            log.debug("kv_watch_stop_failed", error=str(exc))
    return None


async def wait_for_topology(kv, timeout: float, need_endpoints: bool = True,
                            resync_s: float = 0.1) -> control_pb2.Topology:
    """The topology once it exists (and names every worker, if asked); TimeoutError after
    `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            async for topo in follow_key(kv, subjects.TOPOLOGY_KEY, control_pb2.Topology,
                                         resync_s):
                if not need_endpoints or topology_complete(topo):
                    return topo
    except TimeoutError:
        raise TimeoutError("no expert topology from the scheduler in time") from None


def topology_complete(topo: control_pb2.Topology | None) -> bool:
    """The topology names an endpoint for every worker (a roll-out has finished)."""
    return topo is not None and bool(topo.worker_endpoints) and all(topo.worker_endpoints)
