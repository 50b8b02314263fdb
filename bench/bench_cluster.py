"""The whole cluster against the local reference engine, same machine, same model, one run.

Cluster: NATS, scheduler, expert workers, 1 prefill, 1 decode and the router, each its own
process (one torch thread each), started once. At each concurrency c, N requests (random
prompt ids, greedy, EOS ignored) go through the router's gRPC API with at most c in flight;
the client measures output tok/s (all tokens / wall time), TTFT and TPOT per request.

Reference: the same requests on ReferenceEngine in this process (all routed experts local),
run in waves of c (batch size c), on one torch thread by default like every cluster process
(on a small shared machine a multi-threaded torch spin-waits for busy cores and runs many
times slower; --ref-threads changes it). Its TTFT is the wave's prefill time, its TPOT the wave's
mean decode step time, its tok/s all output tokens / the waves' total wall time. Each level's
requests are split into --rounds parts run cluster, reference, cluster, reference, ... so that
a load change on a shared machine hits both sides alike. Ratios are cluster/reference:
above 1 is better for tok/s, below 1 is better for TTFT/TPOT.

Where the time goes comes from Prometheus deltas (scraped before and after each level) of
the prefill and decode processes and of the expert workers:
    forward   = epserve_ep_forward_seconds      one EP forward (prefill batch / decode step)
    compute   = epserve_ep_compute_seconds      the compute thread's busy time in forwards:
                every torch op (embeddings, MLA, dense FFN, gate, shared expert, LM head)
    waiting   = forward - compute               the step's wall time with no local compute:
                dispatches not hidden behind compute, plus thread/event-loop hand-offs
    dispatch  = epserve_ep_dispatch_seconds     MoE dispatch() wall time, attention side; with
                two micro-batches (epserve_ep_split_steps) it overlaps compute, so it can
                exceed waiting; dispatch - waiting is then the part hidden behind compute
  and dispatch splits into
    serialise = epserve_ep_serialize_seconds    tensor<->proto on the attention side
    experts   = epserve_ep_worker_compute_seconds  per dispatch, the slowest worker's
                                                   grouped-FFN time (the critical path)
    net/gRPC/queue = dispatch - serialise - experts  (protobuf framing, loopback, the worker's
                own proto decode/encode, and waiting for a core or the worker's compute thread)
Worker-side totals (epserve_expert_dispatch_seconds, epserve_expert_compute_seconds, summed
over workers, prefill and decode traffic together) are printed as a cross-check: their
difference is the workers' own receive-to-reply overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.results import record
from services.client import InferenceClient, RemoteCompletion
from services.common.metrics_http import scrape_metrics
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.local.cluster import ClusterSpec, LocalCluster
from services.local.demo import percentile
from services.model.config import ModelConfig
from services.model.loader import load_model

ROLES = ("prefill-0", "decode-0")


@dataclass
class Result:
    tokens: int = 0
    wall_s: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def add(self, other: Result) -> None:
        self.tokens += other.tokens
        self.wall_s += other.wall_s
        self.ttft_ms += other.ttft_ms
        self.tpot_ms += other.tpot_ms


def _requests(cfg: ModelConfig, n: int, prompt_len: int, max_tokens: int, seed: int
              ) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [GenerationRequest(f"r{seed}-{i}",
                              torch.randint(5, cfg.vocab_size, (prompt_len,), generator=g).tolist(),
                              params) for i in range(n)]


async def run_cluster(client: InferenceClient, reqs: list[GenerationRequest], c: int) -> Result:
    gate = asyncio.Semaphore(c)

    async def one(r: GenerationRequest) -> RemoteCompletion:
        async with gate:
            return await client.generate(r.request_id, prompt_ids=r.prompt_ids, params=r.params)

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in reqs))
    wall = time.perf_counter() - t0
    bad = [d.request_id for d in done if len(d.token_ids) != reqs[0].params.max_tokens]
    if bad:
        raise RuntimeError(f"requests {bad[:4]} came back short")
    return Result(sum(len(d.token_ids) for d in done), wall, [d.ttft_s * 1e3 for d in done],
                  [d.tpot_s * 1e3 for d in done])


def run_reference(model, reqs: list[GenerationRequest], c: int) -> Result:
    ttft, tpot, tokens, wall = [], [], 0, 0.0
    for i in range(0, len(reqs), c):
        wave = reqs[i:i + c]
        engine = ReferenceEngine(model)
        t0 = time.perf_counter()
        done = engine.generate(wave)
        wall += time.perf_counter() - t0
        s = engine.stats
        tokens += sum(len(d.token_ids) for d in done)
        ttft += [s.prefill_seconds * 1e3] * len(wave)
        tpot += [s.decode_seconds / max(s.decode_steps, 1) * 1e3] * len(wave)
    return Result(tokens, wall, ttft, tpot)


def scrape(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    return {name: scrape_metrics(url) for name, url in cluster.metrics_urls.items()}


class Delta:
    """after - before of one sample, per process or summed over processes with a prefix."""

    missing: set[str] = set()  # metrics some process did not export (counted as 0)

    def __init__(self, before: dict, after: dict) -> None:
        self.before, self.after = before, after

    def __call__(self, proc: str, key: str) -> float:
        names = [n for n in self.after if n == proc or n.startswith(proc + "-")]
        Delta.missing.update(f"{n}: {key}" for n in names if key not in self.after[n])
        return sum(self.after[n].get(key, 0.0) - self.before[n].get(key, 0.0) for n in names)


def print_comparison(args, rows: list[tuple[int, int, Result, Result]]) -> None:
    print(f"\ncluster vs local reference engine: {args.model}, prompt {args.prompt_len} tokens, "
          f"{args.max_tokens} new tokens, greedy; torch threads: reference {torch.get_num_threads()}, "
          f"each cluster process 1")
    print("ratio = cluster / reference (tok/s: above 1 is better; TTFT, TPOT: below 1 is better)")
    print(f"{'conc':>4}{'reqs':>6}  {'metric':<14}{'cluster':>10}{'reference':>11}{'ratio':>9}")
    for c, n, cl, ref in rows:
        metrics = [("output tok/s", cl.tok_s, ref.tok_s)]
        for name, a, b in (("TTFT", cl.ttft_ms, ref.ttft_ms), ("TPOT", cl.tpot_ms, ref.tpot_ms)):
            for q in (50, 99):
                metrics.append((f"{name} p{q} ms", percentile(a, q), percentile(b, q)))
        for i, (name, a, b) in enumerate(metrics):
            head = f"{c:>4}{n:>6}" if i == 0 else " " * 10
            print(f"{head}  {name:<14}{a:>10.1f}{b:>11.1f}{a / b if b else 0.0:>8.2f}x")
        record("cluster", f"tok_s_vs_reference_c{c}", round(cl.tok_s / ref.tok_s, 3))
        for name, a, b in (("ttft", cl.ttft_ms, ref.ttft_ms), ("tpot", cl.tpot_ms, ref.tpot_ms)):
            base = percentile(b, 50)
            record("cluster", f"{name}_p50_vs_reference_c{c}",
                   round(percentile(a, 50) / base, 3) if base else "n/a")


def _share(x: float, total: float) -> str:
    return f"{x:7.2f} ({100 * x / total if total else 0:3.0f}%)"


def print_breakdown(rows: list[tuple[int, Delta]]) -> None:
    print("\nwhere the time goes, per instance: seconds summed over each level; compute and "
          "waiting as % of forward, the dispatch parts as % of dispatch")
    print("waiting = forward - compute; waiting - dispatch: hand-offs outside dispatches if "
          "positive, dispatch hidden behind compute if negative;")
    print("net = dispatch - serialise - experts (gRPC, loopback, worker proto handling, queueing "
          "for a core)")
    print(f"{'conc':>4}  {'instance':<10}{'steps':>6}{'split':>6}{'tok/step':>9}{'forward s':>10}"
          f"{'compute':>15}{'waiting':>15}{'dispatch s':>11}{'wait-disp':>10}{'serialise':>15}{'experts':>15}"
          f"{'net/gRPC/queue':>16}{'B/token':>9}")
    for c, d in rows:
        for role in ROLES:
            fwd = d(role, "epserve_ep_forward_seconds_sum")
            steps = int(d(role, "epserve_ep_forward_seconds_count"))
            split = int(d(role, "epserve_ep_split_steps_total"))
            comp = d(role, "epserve_ep_compute_seconds_total")
            disp = d(role, "epserve_ep_dispatch_seconds_sum")
            ser = d(role, "epserve_ep_serialize_seconds_total")
            exp = d(role, "epserve_ep_worker_compute_seconds_total")
            wire = (d(role, 'epserve_ep_bytes_total{direction="sent"}')
                    + d(role, 'epserve_ep_bytes_total{direction="received"}'))
            tokens = (d("prefill", "epserve_prefill_batch_tokens_sum") if role.startswith("prefill")
                      else d("decode", "epserve_decode_batch_size_sum"))
            print(f"{c:>4}  {role:<10}{steps:>6}{split:>6}{tokens / max(steps, 1):>9.1f}"
                  f"{fwd:>10.2f}{_share(comp, fwd):>15}{_share(fwd - comp, fwd):>15}{disp:>11.2f}"
                  f"{fwd - comp - disp:>10.2f}"
                  f"{_share(ser, disp):>15}{_share(exp, disp):>15}"
                  f"{_share(disp - ser - exp, disp):>16}{wire / max(tokens, 1):>9,.0f}")
            if fwd:
                record("cluster", f"{role.split('-')[0]}_waiting_share_c{c}",
                       round((fwd - comp) / fwd, 3))
    print("\nexpert workers (all, prefill + decode traffic) and KV hand-over (KV transfer: "
          "seconds summed over requests, which overlap)")
    print(f"{'conc':>4}{'worker recv->reply s':>22}{'worker compute s':>18}{'worker overhead s':>19}"
          f"{'critical-path experts s':>25}{'KV transfer s':>15}{'KV MB':>8}")
    for c, d in rows:
        w = d("expert-worker", "epserve_expert_dispatch_seconds_sum")
        wc = d("expert-worker", "epserve_expert_compute_seconds_sum")
        crit = sum(d(r, "epserve_ep_worker_compute_seconds_total") for r in ROLES)
        kv_s = d("prefill", "epserve_prefill_kv_transfer_seconds_sum")
        kv_mb = d("decode", "epserve_decode_kv_bytes_total") / 2**20
        print(f"{c:>4}{w:>22.2f}{wc:>18.2f}{w - wc:>19.2f}{crit:>25.2f}{kv_s:>15.2f}{kv_mb:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    # One event loop for the whole run: grpc.aio binds to the loop that first uses it.
    return asyncio.run(_main(argv))


async def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/v3-mini")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level (default max(16, 4 x concurrency))")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=4,
                    help="cluster/reference alternations per level")
    ap.add_argument("--expert-workers", type=int, default=4)
    ap.add_argument("--redundant-experts", type=int, default=4)
    ap.add_argument("--wire", default="fp32")
    ap.add_argument("--pin-cores", action="store_true",
                    help="the cluster's torch processes one core each (epserve up --pin-cores)")
    ap.add_argument("--ref-threads", type=int, default=1, help="torch threads of the reference")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny settings")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.ref_threads)
    try:
        return await _run(args)
    finally:
        torch.set_num_threads(threads)  # run_all runs every benchmark in this process


async def _run(args: argparse.Namespace) -> int:
    if args.quick:
        args.concurrency, args.requests, args.prompt_len, args.max_tokens = "1,4", 8, 16, 8
    levels = [int(c) for c in args.concurrency.split(",")]
    cfg = ModelConfig.from_dir(args.model)
    model = load_model(args.model)
    spec = ClusterSpec(model=args.model, prefill=1, decode=1, expert_workers=args.expert_workers,
                       redundant_experts=args.redundant_experts, wire=args.wire,
                       log_level="warning", pin_cores=args.pin_cores)
    t0 = time.perf_counter()
    with LocalCluster(spec) as cluster:
        print(f"cluster up in {time.perf_counter() - t0:.1f}s: {spec.expert_workers} expert "
              f"workers (+{spec.redundant_experts} redundant slots), 1 prefill, 1 decode, router; "
              f"wire {spec.wire}", flush=True)
        async with InferenceClient(cluster.router_endpoint) as client:
            warm = _requests(cfg, 4, args.prompt_len, args.max_tokens, seed=999)
            await run_cluster(client, warm, 4)
            run_reference(model, warm, 4)
            comparison, breakdown = [], []
            for c in levels:
                n = args.requests or max(16, 4 * c)
                reqs = _requests(cfg, n, args.prompt_len, args.max_tokens, seed=c)
                cl, ref = Result(), Result()
                before = scrape(cluster)  # the reference runs in this process: no cluster metric
                rounds = max(1, min(args.rounds, n // c))  # each part fills c in flight
                for k in range(rounds):
                    part = reqs[k * n // rounds:(k + 1) * n // rounds]
                    cl.add(await run_cluster(client, part, c))
                    ref.add(run_reference(model, part, c))
                delta = Delta(before, scrape(cluster))
                comparison.append((c, n, cl, ref))
                breakdown.append((c, delta))
                print(f"  concurrency {c}: {n} requests, cluster {cl.tok_s:.1f} tok/s, "
                      f"reference {ref.tok_s:.1f} tok/s", flush=True)
    print_comparison(args, comparison)
    print_breakdown(breakdown)
    if Delta.missing:
        print(f"note: metrics not exported, counted as 0: {sorted(Delta.missing)}")
    ratios = [cl.tok_s / ref.tok_s for _, _, cl, ref in comparison]
    print(f"\ncluster/reference throughput, geometric mean over levels: "
          f"{statistics.geometric_mean(ratios):.2f}x")
    record("cluster", "model", Path(args.model).name)
    record("cluster", "tok_s_vs_reference_geomean", round(statistics.geometric_mean(ratios), 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
