"""`make run`: the main job on the built-in small model.

Starts a whole cluster (NATS, scheduler, ledger, expert workers, prefill, decode, router; every
service its own process), sends a demo workload of concurrent requests through the public gRPC
API, prints a summary ending with the workload's own cost, revenue and margin from the ledger,
and stops everything it started. `--local` runs the single-process
reference engine instead (no cluster).

The default model is the committed demo checkpoint, checkpoints/bard-moe: a DeepSeek-V3 MoE
trained on Shakespeare (`epserve train`), so the completions read as text and the expert loads
come from real routing. Prompts are speaker names as the plays set them (`Romeo.`, `MACBETH.`;
`BRUTUS.` and `MALVOLIO.` speak only in the held-out plays) and a few lines it never read.
Every request samples with its own seed (temperature 0.8, top-p 0.95): a model this small
loops when greedy, and seeded sampling is exact in this system, so a rerun prints the same.
A checkpoint with an MTP layer (bard-moe has one) is served with speculative decoding
(`--speculative mtp`); the summary says how many drafts decode accepted. The text is the same
either way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

from services.client import InferenceClient, RemoteCompletion
from services.common.metrics_http import scrape_metrics
from services.economics import money
from services.engine.sampling import SamplingParams
from services.ledger.report import live_report, read_live
from services.local.cluster import ClusterSpec, LocalCluster
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "bard-moe"
PROMPTS = (
    "Romeo.\n",
    "MACBETH.\n",
    "BRUTUS.\n",  # Julius Caesar is held out of training
    "Juliet.\nO Romeo, Romeo!",
    "MALVOLIO.\n",  # so is Twelfth Night
    "The mixture of experts routes each token to",
    "Prefill and decode run on separate machines because",
    "KING LEAR.\nThe router picks",
)


def demo_params(i: int, max_tokens: int) -> SamplingParams:
    """Request i's sampling: seeded, so the demo's text is the same on every run."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i,
                          ignore_eos=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_workload(endpoint: str, requests: int, concurrency: int, max_tokens: int
                       ) -> tuple[list[RemoteCompletion], float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(client: InferenceClient, i: int) -> RemoteCompletion:
        async with gate:
            return await client.generate(f"demo-{i}", prompt=PROMPTS[i % len(PROMPTS)],
                                         params=demo_params(i, max_tokens))

    async with InferenceClient(endpoint) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(client, i) for i in range(requests)))
        return list(done), time.perf_counter() - t0


async def expert_loads(cluster: LocalCluster) -> dict[str, int]:
    """Routed tokens each expert worker computed (sum over its slots and layers)."""
    out = {}
    for name in sorted(cluster.endpoints):
        if not name.startswith("expert-worker"):
            continue
        async with cluster.channel(name) as channel:  # as the operator (mTLS when on)
            load = await expert_pb2_grpc.ExpertWorkerStub(channel).Load(
                expert_pb2.ExpertLoadRequest(), timeout=10)
        out[name] = sum(sum(layer.tokens) for layer in load.layers)
    return out


def print_completion(prompt: str, text: str) -> None:
    """The prompt, then what the model wrote, indented, as a reader sees a play."""
    body = (prompt + text).strip("\n").replace("\n", "\n    ")
    print(f"  > {body}\n")


def print_summary(done: list[RemoteCompletion], wall: float, loads: dict[str, int]) -> None:
    prompt = sum(c.prompt_tokens for c in done)
    output = sum(len(c.token_ids) for c in done)
    ttft = [c.ttft_s * 1000 for c in done]
    tpot = [c.tpot_s * 1000 for c in done if len(c.token_ids) > 1]
    print(f"\nrequests      {len(done)} in {wall:.2f}s "
          f"({sum(c.finish_reason in ('length', 'stop') for c in done)} finished)")
    print(f"tokens        {prompt} input, {output} output")
    print(f"throughput    {output / wall:,.1f} output tok/s, {(prompt + output) / wall:,.1f} "
          f"total tok/s")
    print(f"TTFT  ms      p50 {percentile(ttft, 50):8.1f}   p99 {percentile(ttft, 99):8.1f}")
    print(f"TPOT  ms      p50 {percentile(tpot, 50):8.1f}   p99 {percentile(tpot, 99):8.1f}")
    total = sum(loads.values()) or 1
    print("expert load   routed tokens computed per expert worker:")
    for name, tokens in loads.items():
        print(f"  {name:18s} {tokens:8d}  ({100 * tokens / total:5.1f}%)")
    if loads:
        mean = statistics.mean(loads.values())
        print(f"  balancedness (mean/max) {mean / max(loads.values()):.3f}")


def print_drafts(metrics_url: str) -> None:
    """Speculative decoding's tally, from the decode instance's metrics."""
    m = scrape_metrics(metrics_url)
    drafted = sum(v for k, v in m.items() if k.startswith("epserve_decode_spec_draft_tokens_total"))
    accepted = sum(v for k, v in m.items()
                   if k.startswith("epserve_decode_spec_accepted_tokens_total"))
    share = f" ({100 * accepted / drafted:.1f}%)" if drafted else ""
    print(f"speculative   MTP drafts accepted {accepted:,.0f} of {drafted:,.0f}{share}: "
          f"{accepted:,.0f} decode steps saved, the text unchanged")


def print_margin(nats_url: str, requests: int, wait_s: float = 30.0, tls_dir: str = "") -> None:
    """The workload's own economics, from the cluster's ledger (what `epserve economics live`
    prints), once it has billed every request (or after `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        ledger = asyncio.run(read_live(nats_url, tls_dir=tls_dir))
        if ledger.records_billed >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    built = live_report(ledger.entries, now=time.time())
    if built is None:
        print("economics     the ledger has billed nothing (see its log)")
        return
    report = built[0]
    print(f"economics     {ledger.records_billed} of {requests} requests billed "
          f"(epserve economics live): revenue {money.usd(report.revenue_usd, 6)}, cost "
          f"{money.usd(report.cost_usd, 4)} for {money.number(report.gpu_hours, 4)} device-hours "
          f"at {money.usd(report.usd_per_gpu_hour)}/h")
    print(f"margin        {money.percent(report.margin)} (a demo: a few requests, idle devices "
          "most of the time)")


def speculative(args: argparse.Namespace) -> str:
    """--speculative auto: mtp when the checkpoint has an MTP layer."""
    if args.speculative != "auto":
        return args.speculative
    return "mtp" if ModelConfig.from_dir(args.model).num_nextn_predict_layers else "off"


def run_cluster(args: argparse.Namespace) -> int:
    spec = ClusterSpec(model=args.model, prefill=1, decode=1, expert_workers=args.expert_workers,
                       redundant_experts=args.redundant_experts, speculative=speculative(args))
    print(f"starting the cluster: NATS, scheduler, ledger, {spec.expert_workers} expert workers, "
          f"1 prefill, 1 decode, router (each its own process) ...", flush=True)
    t0 = time.perf_counter()
    with LocalCluster(spec) as cluster:
        print(f"cluster up in {time.perf_counter() - t0:.1f}s; router at "
              f"{cluster.router_endpoint}", flush=True)
        done, wall = asyncio.run(run_workload(cluster.router_endpoint, args.requests,
                                              args.concurrency, args.max_tokens))
        for i, c in enumerate(done[: len(PROMPTS)]):
            print_completion(PROMPTS[i % len(PROMPTS)], c.text)
        print_summary(done, wall, asyncio.run(expert_loads(cluster)))
        if spec.speculative == "mtp":
            print_drafts(cluster.metrics_urls["decode-0"])
        print_margin(cluster.nats_url, len(done),
                     tls_dir=str(cluster.tls.dir("operator")) if cluster.tls else "")
        print("\nstopping the cluster ...", flush=True)
    print("stopped cleanly")
    return 0


def run_local(args: argparse.Namespace) -> int:
    from services.engine.reference import GenerationRequest, ReferenceEngine, mtp_drafter
    from services.model.loader import load_model
    from services.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.model)
    mtp = speculative(args) == "mtp"
    model = load_model(args.model, mtp=mtp)
    engine = ReferenceEngine(model, drafter=mtp_drafter(model) if mtp else None)
    requests = [GenerationRequest(f"demo-{i}", tok.encode(p), demo_params(i, args.max_tokens))
                for i, p in enumerate(PROMPTS)]
    for prompt, c in zip(PROMPTS, engine.generate(requests), strict=True):
        print_completion(prompt, tok.decode(c.token_ids, skip_special_tokens=True))
    s = engine.stats
    print(f"\nprefill: {s.prefill_tokens} tokens, {s.prefill_tok_s:,.0f} tok/s")
    print(f"decode:  {s.decode_tokens} tokens in {s.decode_steps} steps, "
          f"{s.decode_tok_s:,.1f} tok/s")
    if s.drafts is not None:
        print(f"speculative: MTP draft acceptance {s.drafts.acceptance():.1%}, "
              f"{s.drafts.tokens_per_step:.2f} tokens per sequence per step")
    return 0


def main(argv: list[str] | None = None) -> int:
    # asyncio warns when a TLS connection to NATS closes ("returning true from eof_received()
    # has no effect when using ssl"): nats-py's doing, harmless, and noise in the demo's output
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT_MODEL),
                    help="checkpoint directory (default: the trained demo model)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--expert-workers", type=int, default=4)
    ap.add_argument("--redundant-experts", type=int, default=4)
    ap.add_argument("--speculative", choices=["auto", "off", "mtp"], default="auto",
                    help="MTP speculative decoding (auto: when the checkpoint has the layer)")
    ap.add_argument("--local", action="store_true", help="reference engine only, no cluster")
    args = ap.parse_args(argv)
    return run_local(args) if args.local else run_cluster(args)


if __name__ == "__main__":
    sys.exit(main())
