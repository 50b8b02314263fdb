"""The cluster under test and what the suite reads from it: health, usage records, topology,
metrics and log lines. Every wait has a deadline.

One cluster serves every scenario of a run: 2 routers (HTTP too), the scheduler, 2 prefill,
2 decode and 4 expert workers, each behind a link proxy, every routed expert on two workers,
supervised (a process that exits is restarted). Its logs go to $EPSERVE_CHAOS_LOG_DIR
(default tests/chaos/logs/, emptied at the start of a run; NATS's log is copied there at stop).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time
from pathlib import Path

import nats

from services.balance.placement import PlacementTable
from services.balance.placement_proto import table_from
from services.common import subjects
from services.common.control import kv_get, topology_complete
from services.common.metrics_http import scrape_metrics
from services.local.cluster import ClusterSpec, LocalCluster
from services.local.procs import ServiceStartError
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import control_pb2
from tests.chaos.history import UsageRow

LOG_DIR = Path(os.environ.get("EPSERVE_CHAOS_LOG_DIR", Path(__file__).parent / "logs"))
START_TIMEOUT_S = 300.0
HEAL_TIMEOUT_S = 180.0
HEALTH_CHECK_S = 1.0
SETTLE_S = 2.0  # after health: heartbeats (0.5 s) reach the routers' views of the instances


def chaos_spec(model_dir: str | Path) -> ClusterSpec:
    experts = ModelConfig.from_dir(model_dir).n_routed_experts
    # decode-0 decodes speculatively (MTP), decode-1 plainly: requests migrate both ways
    speculative = "mtp" if ModelConfig.from_dir(model_dir).num_nextn_predict_layers else "off"
    return ClusterSpec(model=str(model_dir), prefill=2, decode=2, expert_workers=4,
                       redundant_experts=experts, routers=2, restart=True, link_latency_ms=0.0,
                       http_port=0, max_inflight=64, speculative=speculative,
                       speculative_decodes=1)


def start_cluster(model_dir: str | Path, log_dir: Path = LOG_DIR, attempts: int = 2
                  ) -> LocalCluster:
    """Starts the cluster; a start that failed because a port chosen free was taken before
    its process bound it (LocalCluster picks ports, then starts the processes: a race with
    anything else on the machine) is tried again, and says so."""
    for attempt in range(1, attempts + 1):
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        cluster = LocalCluster(chaos_spec(model_dir), log_dir=log_dir)
        try:
            return cluster.start(timeout=START_TIMEOUT_S)
        except ServiceStartError as exc:
            if "address already in use" not in str(exc) or attempt == attempts:
                print(cluster.log_tails(40))
                raise
            print(f"cluster start {attempt} lost a port race, starting again: "
                  f"{str(exc).splitlines()[0]}")
    raise AssertionError("unreachable")


def stop_cluster(cluster: LocalCluster, grace_s: float = 15.0) -> None:
    """Stops the supervisor, SIGTERMs every service at once (each drains; one by one would
    take a minute), then LocalCluster.stop() reaps them (SIGKILL after its grace)."""
    if cluster.nats is not None and cluster.nats.log_path and cluster.nats.log_path.exists():
        shutil.copy(cluster.nats.log_path, cluster.log_dir / "nats.log")
    if cluster.supervisor is not None:
        cluster.supervisor.stop()
    for proc in cluster.group:
        if is_stopped(proc.pid):
            proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.is_running() for p in cluster.group) and time.monotonic() < deadline:
        time.sleep(0.1)
    slow = [p.name for p in cluster.group if p.is_running()]
    if slow:
        print(f"\nstill running {grace_s:.0f}s after SIGTERM (killed): {', '.join(slow)}")
    codes = cluster.stop()
    print(f"exit codes: {codes}")


def process_names(cluster: LocalCluster) -> list[str]:
    return [p.name for p in cluster.group]


def is_stopped(pid: int | None) -> bool:
    """True when the process is in the stopped state (SIGSTOP): it must never be left so."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


async def nats_ok(url: str, timeout: float = HEALTH_CHECK_S, **connect_kw) -> bool:
    """`connect_kw`, here and below: the cluster's `nats_options()` (its TLS identity)."""
    try:
        nc = await nats.connect(url, connect_timeout=timeout, allow_reconnect=False,
                                max_reconnect_attempts=0, **connect_kw)
    except Exception:
        return False
    try:
        js = nc.jetstream(timeout=timeout)
        topo = await kv_get(await js.key_value(subjects.TOPOLOGY_BUCKET), subjects.TOPOLOGY_KEY,
                            control_pb2.Topology)
        return topology_complete(topo)
    except Exception:
        return False
    finally:
        await nc.close()


async def unhealthy(cluster: LocalCluster) -> list[str]:
    """What is not healthy now: a process not running or stopped, a gRPC health check that is
    not SERVING (every service, and every worker through its link proxy), NATS not answering
    or the expert topology incomplete."""
    bad = []
    nats_pid = cluster.nats.pid if cluster.nats is not None else None
    if cluster.nats is None or not cluster.nats.is_running() or is_stopped(nats_pid):
        bad.append("nats: not running")
    for proc in cluster.group:
        if not proc.is_running():
            bad.append(f"{proc.name}: not running")
        elif is_stopped(proc.pid):
            bad.append(f"{proc.name}: stopped")
    checks = list(cluster.endpoints.items())
    results = await asyncio.gather(*(cluster.check_health(name, HEALTH_CHECK_S)
                                     for name, _ in checks))
    bad += [f"{name}: not SERVING on {t}" for (name, t), ok in zip(checks, results, strict=True)
            if not ok]
    if not bad and not await nats_ok(cluster.nats_url, **cluster.nats_options()):
        bad.append("nats: no answer or expert topology incomplete")
    return bad


async def wait_healthy(cluster: LocalCluster, timeout: float = HEAL_TIMEOUT_S) -> float:
    """Seconds until everything is healthy; raises TimeoutError naming what is not."""
    t0 = time.monotonic()
    bad: list[str] = []
    while time.monotonic() - t0 < timeout:
        bad = await unhealthy(cluster)
        if not bad:
            await asyncio.sleep(SETTLE_S)
            if not (bad := await unhealthy(cluster)):
                return time.monotonic() - t0
        await asyncio.sleep(0.5)
    raise TimeoutError(f"cluster not healthy after {timeout:.0f}s: {'; '.join(bad)}")


async def topology(url: str, **connect_kw) -> PlacementTable:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=2, **connect_kw)
    try:
        js = nc.jetstream(timeout=5)
        topo = await kv_get(await js.key_value(subjects.TOPOLOGY_BUCKET), subjects.TOPOLOGY_KEY,
                            control_pb2.Topology)
        return table_from(topo)
    finally:
        await nc.close()


def replica_partner(table: PlacementTable, rank: int) -> int:
    """The other worker holding the most of `rank`'s experts (its replicas)."""
    mine = {(layer, e) for layer in table.layer_ids
            for e in table.logical_experts_on_worker(layer, rank)}
    shared = {w: len(mine & {(layer, e) for layer in table.layer_ids
                             for e in table.logical_experts_on_worker(layer, w)})
              for w in range(table.num_workers) if w != rank}
    return max(shared, key=lambda w: (shared[w], -w))


async def _read_stream(url: str, timeout: float, **connect_kw) -> list[UsageRow]:
    nc = await nats.connect(url, connect_timeout=min(timeout, 5), max_reconnect_attempts=2,
                            **connect_kw)
    try:
        js = nc.jetstream(timeout=min(timeout, 5))
        last = (await js.stream_info(subjects.USAGE_STREAM)).state.last_seq
        rows: list[UsageRow] = []
        if not last:
            return rows
        sub = await js.subscribe(subjects.USAGE_SUBJECT, ordered_consumer=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            rec = control_pb2.UsageRecord()
            rec.ParseFromString(msg.data)
            rows.append(UsageRow.from_proto(rec))
            if msg.metadata.sequence.stream >= last:
                break
        await sub.unsubscribe()
        return rows
    finally:
        await nc.close()


async def read_usage(url: str, prefix: str, want: set[str], timeout: float = 45.0,
                     **connect_kw) -> list[UsageRow]:
    """The usage records of requests whose id starts with `prefix`; waits (up to `timeout`)
    until every id in `want` has one: records spooled while NATS was away come later."""
    deadline = time.monotonic() + timeout
    rows: list[UsageRow] = []
    while True:
        try:
            rows = [r for r in await _read_stream(url, max(1.0, deadline - time.monotonic()),
                                                  **connect_kw)
                    if r.request_id.startswith(prefix)]
        except Exception as exc:  # NATS restarting: try again until the deadline
            print(f"usage read failed ({type(exc).__name__}: {exc}); retrying")
        if want <= {r.request_id for r in rows} or time.monotonic() >= deadline:
            return rows
        await asyncio.sleep(1.0)


async def scrape(cluster: LocalCluster, name: str, timeout: float = 0.5) -> dict[str, float]:
    """A process's metrics, {} when it does not answer in time (stopped, restarting)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(
            scrape_metrics, cluster.metrics_urls[name], timeout), timeout + 0.5)
    except Exception:
        return {}


def log_sizes(cluster: LocalCluster) -> dict[Path, int]:
    return {p: p.stat().st_size for p in cluster.log_dir.glob("*.log")}


NOTEWORTHY = ('"level": "error"', '"level": "warning"', '"level": "critical"', "Traceback",
              "[error", "[warning", "Error:")


def log_excerpt(cluster: LocalCluster, since: dict[Path, int], per_file: int = 12) -> str:
    """Warning and error lines every process logged since `since` (deduplicated by text
    without timestamps), per log file."""
    parts = []
    for path in sorted(cluster.log_dir.glob("*.log")):
        with path.open("rb") as f:
            f.seek(since.get(path, 0))
            lines = f.read().decode(errors="replace").splitlines()
        seen, keep = set(), []
        for line in lines:
            if any(k in line for k in NOTEWORTHY):
                key = _strip_time(line)
                if key not in seen:
                    seen.add(key)
                    keep.append(line[:400])
        if keep:
            parts.append(f"--- {path.name} ({len(keep)} distinct) ---\n"
                         + "\n".join(keep[:per_file]))
    return "\n".join(parts)


def _strip_time(line: str) -> str:
    return re.sub(r'"(timestamp|ts|time)": "[^"]*"|\d{4}-\d\d-\d\dT[\d:.]+Z?|pid[ =]\d+', "",
                  line)[:200]
