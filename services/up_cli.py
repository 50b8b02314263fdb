"""`epserve up`: a whole cluster on this machine, every service its own process, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from services.cluster import ClusterSpec, LocalCluster
from services.common.errors import CliError
from services.common.procs import ServiceStartError


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prefill", type=int, default=1, help="prefill instances")
    p.add_argument("--decode", type=int, default=1, help="decode instances")
    p.add_argument("--expert-workers", type=int, default=4, help="expert workers (EP ranks)")
    p.add_argument("--redundant-experts", type=int, default=0, help="redundant expert slots")
    p.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "fp8"],
                   help="expert dispatch/combine format")
    p.add_argument("--kv-blocks", type=int, default=256, help="KV blocks per decode instance")
    p.add_argument("--max-inflight", type=int, default=64, help="router admission bound")
    p.add_argument("--host", default="127.0.0.1", help="address every service binds")
    p.add_argument("--log-dir", default="", help="keep service logs here (default: a temp dir)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds to wait for every service to become healthy")


def spec_from(args: argparse.Namespace, router_port: int = 0) -> ClusterSpec:
    if not Path(args.model, "config.json").is_file():
        raise CliError(f"{args.model!r} is not a checkpoint directory (no config.json); "
                       f"make one with: epserve make-model --preset v3-mini --out {args.model}")
    try:
        return ClusterSpec(model=args.model, prefill=args.prefill, decode=args.decode,
                           expert_workers=args.expert_workers,
                           redundant_experts=args.redundant_experts, router_port=router_port,
                           host=args.host, wire=args.wire, kv_blocks=args.kv_blocks,
                           max_inflight=args.max_inflight, log_level=args.log_level)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def start_cluster(spec: ClusterSpec, log_dir: str, timeout: float) -> LocalCluster:
    cluster = LocalCluster(spec, log_dir or None)
    try:
        return cluster.start(timeout)
    except (ServiceStartError, TimeoutError, RuntimeError) as exc:
        raise CliError(f"cluster did not start: {exc}") from exc


def register(subparsers) -> None:
    p = subparsers.add_parser("up", help="run a whole cluster locally until Ctrl-C / SIGTERM")
    add_cluster_args(p)
    p.add_argument("--port", type=int, default=0, help="router gRPC port (0 = a free one)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    spec = spec_from(args, args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting: NATS, scheduler, {spec.expert_workers} expert workers, {spec.prefill} "
          f"prefill, {spec.decode} decode, router ...", flush=True)
    cluster = start_cluster(spec, args.log_dir, args.start_timeout)
    try:
        print(f"router listening on {cluster.router_endpoint}", flush=True)
        print(f"  NATS {cluster.nats_url}; logs in {cluster.log_dir}", flush=True)
        print(f"  try: epserve generate --endpoint {cluster.router_endpoint} "
              f"--prompt 'Hello' --max-tokens 16", flush=True)
        while not stop.wait(0.5):
            dead = [p.name for p in cluster.group if not p.is_running()]
            if dead:
                print(f"service(s) exited: {', '.join(dead)}; stopping the cluster", flush=True)
                print(cluster.log_tails(20), flush=True)
                return 1
    finally:
        codes = cluster.stop()
        print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()), flush=True)
    return 0
