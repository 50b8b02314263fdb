"""`epserve up`: a whole cluster on this machine, every service its own process, until Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
from pathlib import Path

from services.common.errors import CliError
from services.engine.microbatch import SPLIT_POLICIES
from services.local.cluster import ClusterSpec, LocalCluster
from services.local.procs import ServiceStartError
from services.model.config import ModelConfig


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
    plan = p.add_argument_group("overlap plan (seeds the scheduler's plan while NATS has none)")
    plan.add_argument("--micro-batches", type=int, choices=[1, 2], default=None,
                      help="micro-batches per step: 2 overlaps dispatch with compute "
                           "(default: the scheduler's, 1)")
    plan.add_argument("--split-policy", choices=list(SPLIT_POLICIES), default=None,
                      help="how a step is split in two (default: balanced_attention)")
    plan.add_argument("--min-batch-tokens", type=int, default=None,
                      help="steps with fewer tokens run as one micro-batch (default: 16)")
    plan.add_argument("--fixed-split", action="store_true",
                      help="split every step the two flags above allow; by default each "
                           "instance measures whether two micro-batches pay and runs the "
                           "faster way")
    p.add_argument("--speculative", choices=["off", "mtp"], default="off",
                   help="speculative decoding on the decode instances: mtp drafts a token per "
                        "step with the checkpoint's multi-token-prediction layer (output "
                        "unchanged; make one with `epserve make-model --mtp`)")
    plan.add_argument("--trace-dir", default="",
                      help="every prefill/decode instance writes a Chrome trace DIR/<name>.json")
    eplb = p.add_argument_group("live expert rebalancing (off by default)")
    eplb.add_argument("--rebalance-threshold", type=float, default=0.0,
                      help="scheduler re-plans the placement when its balancedness on recent "
                           "load drops below this (0 = off)")
    eplb.add_argument("--rebalance-period-s", type=float, default=0.0,
                      help="also re-plan this often (0 = off)")
    p.add_argument("--pin-cores", action="store_true",
                   help="one CPU core each for the prefill, decode and expert-worker processes, "
                        "dealt round-robin (default: every process runs on any core)")
    p.add_argument("--insecure", action="store_true",
                   help="no mTLS between services and no NATS TLS/users (default: a CA and a "
                        "certificate per process are made in the run dir)")
    p.add_argument("--api-keys", action="store_true",
                   help="routers require an API key (make them with `epserve keys create`)")
    cache = p.add_argument_group("prefix KV cache (off unless a directory is given)")
    cache.add_argument("--kv-cache-dir", default="",
                       help="directory every prefill instance shares for prefix KV pages")
    cache.add_argument("--kv-cache-bytes", type=int, default=None,
                       help="its disk budget (default: the prefill's, 8 GiB)")
    cache.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                       help="each prefill instance's memory tier (default: 512 MiB)")
    link = p.add_argument_group("shaped links (one `epserve link-proxy` per expert worker)")
    link.add_argument("--link-latency-ms", type=float, default=None,
                      help="one-way latency added between attention instances and each expert "
                           "worker")
    link.add_argument("--link-bandwidth-mbps", type=float, default=None,
                      help="per-direction bandwidth of each expert worker's link")


def spec_from(args: argparse.Namespace, router_port: int = 0) -> ClusterSpec:
    if not Path(args.model, "config.json").is_file():
        raise CliError(f"{args.model!r} is not a checkpoint directory (no config.json); "
                       f"make one with: epserve make-model --preset v3-mini --out {args.model}")
    if args.speculative == "mtp" and not ModelConfig.from_dir(args.model).num_nextn_predict_layers:
        raise CliError(f"--speculative mtp: {args.model} has no multi-token-prediction layer "
                       "(num_nextn_predict_layers is 0)")
    try:
        return ClusterSpec(model=args.model, prefill=args.prefill, decode=args.decode,
                           expert_workers=args.expert_workers,
                           redundant_experts=args.redundant_experts, router_port=router_port,
                           host=args.host, wire=args.wire, kv_blocks=args.kv_blocks,
                           max_inflight=args.max_inflight, log_level=args.log_level,
                           micro_batches=args.micro_batches, split_policy=args.split_policy,
                           min_batch_tokens=args.min_batch_tokens,
                           fixed_split=args.fixed_split, speculative=args.speculative,
                           trace_dir=str(Path(args.trace_dir).resolve()) if args.trace_dir else "",
                           link_latency_ms=args.link_latency_ms,
                           link_bandwidth_mbps=args.link_bandwidth_mbps,
                           kv_cache_dir=str(Path(args.kv_cache_dir).resolve())
                           if args.kv_cache_dir else "",
                           kv_cache_bytes=args.kv_cache_bytes,
                           kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                           tls=not getattr(args, "insecure", False),
                           pin_cores=getattr(args, "pin_cores", False),
                           extra={"scheduler": (
                               "--rebalance-threshold", str(args.rebalance_threshold),
                               "--rebalance-period-s", str(args.rebalance_period_s)),
                               "router": ("--api-keys",) if args.api_keys else ()})
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
    p.add_argument("--port", type=int, default=0, help="router-0's gRPC port (0 = a free one)")
    p.add_argument("--routers", type=int, default=1, help="routers (each its own endpoint)")
    p.add_argument("--nats-nodes", type=int, default=1, choices=[1, 3, 5],
                   help="NATS nodes: 3 runs a JetStream cluster with every stream and bucket "
                        "replicated, so one node can die")
    p.add_argument("--no-restart", action="store_true",
                   help="do not restart a process that exits: stop the whole cluster instead "
                        "(debugging)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API on this port (0 = a free one)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    spec = dataclasses.replace(spec_from(args, args.port), http_port=args.http_port,
                               routers=args.routers, restart=not args.no_restart,
                               nats_nodes=args.nats_nodes)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting: NATS, scheduler, ledger, {spec.expert_workers} expert workers, {spec.prefill} "
          f"prefill, {spec.decode} decode, {spec.routers} router(s) ...", flush=True)
    cluster = start_cluster(spec, args.log_dir, args.start_timeout)
    try:
        print(f"router listening on {', '.join(cluster.router_endpoints)}", flush=True)
        for url in cluster.http_urls:
            print(f"OpenAI-compatible HTTP API on {url}/v1", flush=True)
        print(f"  NATS {cluster.nats_url}; logs in {cluster.log_dir}", flush=True)
        if cluster.tls is not None:
            print(f"  mTLS on: certificates in {cluster.tls.root} (CLI identity: --tls-dir "
                  f"{cluster.tls.dir('operator')}); --insecure turns it off", flush=True)
        if spec.shaped_links:
            print(f"  expert workers behind link proxies ({spec.link_latency_ms or 0} ms one-way"
                  + (f", {spec.link_bandwidth_mbps} Mbit/s" if spec.link_bandwidth_mbps else "")
                  + "); control ports: " + ", ".join(
                      f"worker {r} {h}:{p}" for r, (h, p) in cluster.link_controls.items()),
                  flush=True)
        if spec.trace_dir:
            print(f"  Chrome traces (written every few seconds and at exit) in {spec.trace_dir}",
                  flush=True)
        print(f"  try: epserve generate --endpoint {cluster.router_endpoint} "
              f"--prompt 'Hello' --max-tokens 16", flush=True)
        if spec.ledger:
            print(f"  cost, revenue and margin so far: epserve economics live --nats-url "
                  f"{cluster.nats_url}", flush=True)
        if cluster.supervisor is not None:
            cluster.supervisor.on_restart = lambda name, code, n: print(
                f"restarted {name} (exit code {code}; restart {n})", flush=True)
        while not stop.wait(0.5):
            dead = [p.name for p in cluster.group if not p.is_running()]
            if dead and cluster.supervisor is None:
                print(f"service(s) exited: {', '.join(dead)}; stopping the cluster "
                      f"(--no-restart)", flush=True)
                print(cluster.log_tails(20), flush=True)
                return 1
    finally:
        restarts = cluster.restarts
        codes = cluster.stop()
        print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()), flush=True)
        if restarts:
            print("restarts: " + ", ".join(f"{k}={v}" for k, v in sorted(restarts.items())),
                  flush=True)
    return 0
