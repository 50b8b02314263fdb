"""A local JetStream cluster: N nats-server processes (NatsServer nodes) on loopback ports.

Each node has its own store dir, client port, route port and monitoring port; the routes join
them into one cluster with JetStream (`sync_interval: always`, as every NatsServer). `start()`
returns once the cluster has a JetStream meta leader that knows all N peers, so a stream or KV
bucket with 3 replicas can be created at once. `urls` lists every node's client URL,
comma-separated: what `services.common.control.connect` (and the services' --nats-url) take,
so a client fails over to a surviving node. Chaos tests SIGKILL a node by its `.pid` and
bring it back with `.restart()` (same ports, same store).

size=1 is one plain NatsServer (no cluster block): the single-node behaviour.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from services.local.nats_server import NatsServer, NatsServerError
from services.local.ports import free_port

POLL_S = 0.05
HTTP_TIMEOUT_S = 1.0


class NatsCluster:
    def __init__(
        self,
        size: int = 3,
        store_root: str | Path | None = None,
        host: str = "127.0.0.1",
        name: str = "epserve",
        binary: str | None = None,
        startup_timeout: float = 30.0,
        stop_grace: float = 5.0,
        tls_dirs: list[Path] | None = None,
        client_tls=None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        if startup_timeout <= 0:
            raise ValueError("startup_timeout must be > 0")
        self.size, self.host, self.name = size, host, name
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self._given_root = Path(store_root) if store_root is not None else None
        self._tmp_root: Path | None = None  # ours, removed by stop()
        self.nodes: list[NatsServer] = []
        # TLS with per-role users: node i's server identity dir, an operator's client context.
        if tls_dirs is not None and len(tls_dirs) != size:
            raise ValueError(f"need {size} TLS identity dirs, got {len(tls_dirs)}")
        self.tls_dirs, self.client_tls = tls_dirs, client_tls

    # -- addresses -------------------------------------------------------------------------

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (nats-py's `servers`, split on commas)."""
        if not self.nodes:
            raise NatsServerError("the cluster has not been started yet")
        return ",".join(node.url for node in self.nodes)

    @property
    def url(self) -> str:
        return self.urls

    @property
    def server_urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> NatsCluster:
        if self.nodes:
            raise NatsServerError("already started")
        root = self._given_root
        if root is None:
            root = self._tmp_root = Path(tempfile.mkdtemp(prefix="epserve-nats-cluster-"))
        try:
            self.nodes = self._make_nodes(root)
            for node in self.nodes:
                node.start()
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops every node by pid (each SIGTERM, then SIGKILL after the grace); removes the
        store root when it is ours."""
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # still stop the others
                errors.append(exc)
        self.nodes = []
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
            self._tmp_root = None
        if errors:
            raise errors[0]

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- JetStream meta leader -------------------------------------------------------------

    def meta_leader(self) -> str | None:
        """The meta leader's server name as the running nodes agree on it, else None."""
        if self.size == 1:
            return self.nodes[0].server_name if self.nodes[0].is_running() else None
        leaders = set()
        for node in self.nodes:
            if not node.is_running():
                continue
            meta = _jsz(node).get("meta_cluster") or {}
            if not meta.get("leader") or meta.get("cluster_size", 0) < self.size:
                return None
            leaders.add(meta["leader"])
        return leaders.pop() if len(leaders) == 1 else None

    def wait_ready(self, timeout: float) -> str:
        """Blocks until the running nodes agree on a meta leader that knows every peer; its
        name. NatsServerError (with the nodes' log tails) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.pid is not None and not node.is_running():
                    raise NatsServerError(f"{node.server_name} exited\n{node.log_tail()}")
            try:
                leader = self.meta_leader()
                if leader:
                    return leader
                last = "no meta leader yet"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(POLL_S)
        tails = "\n".join(f"--- {n.server_name}\n{n.log_tail(15)}" for n in self.nodes)
        raise NatsServerError(f"no JetStream meta leader after {timeout}s ({last})\n{tails}")

    # -- internals -------------------------------------------------------------------------

    def _make_nodes(self, root: Path) -> list[NatsServer]:
        if self.size == 1:
            return [NatsServer(store_dir=root / "node-0", monitor_port=0, host=self.host,
                               binary=self.binary, stop_grace=self.stop_grace,
                               server_name=f"{self.name}-0", **self._tls(0))]
        route_ports = [free_port(self.host) for _ in range(self.size)]
        nodes = []
        for i in range(self.size):
            routes = [f"nats-route://{self.host}:{p}" for j, p in enumerate(route_ports)
                      if j != i]
            nodes.append(NatsServer(
                store_dir=root / f"node-{i}", monitor_port=0, host=self.host,
                binary=self.binary, stop_grace=self.stop_grace,
                server_name=f"{self.name}-{i}", cluster_name=self.name,
                cluster_port=route_ports[i], routes=routes, **self._tls(i)))
        return nodes

    def _tls(self, i: int) -> dict:
        if self.tls_dirs is None:
            return {}
        return {"tls_dir": self.tls_dirs[i], "client_tls": self.client_tls}


def _jsz(node: NatsServer) -> dict:
    """The node's /jsz monitoring document."""
    with urllib.request.urlopen(f"{node.monitor_url}/jsz", timeout=HTTP_TIMEOUT_S) as reply:
        return json.loads(reply.read())

