"""The prefix KV cache on a multi-turn workload with a shared system prompt, same run:
no cache, the cache (disk + memory tier), and the cache on an artificially slow store.

Three clusters (1 prefill, 1 decode, expert workers, router; no ledger) are started once and
run the same workload in turn, round after round, so that a load change on a shared machine
hits all alike. Workload: C conversations at once, each T turns; every prompt is the shared
system prompt, the conversation so far (its user turns and the model's replies) and a new
user turn, so turn t re-sends everything turn t-1 had. Measured by the client: TTFT per
request; from the responses' usage: hit rate (cached / prompt tokens) and prompt tokens per
TTFT-second (hits counted as input, as DeepSeek's 73.7k tok/s per node counts them). The slow
store adds --read-delay-ms to every page read and has no memory tier: the read planner must
notice that reading loses to recomputing, so TTFT with it stays within 5% of no cache.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from bench.results import record
from services.client import InferenceClient
from services.engine.sampling import SamplingParams
from services.local.cluster import ClusterSpec, LocalCluster
from services.model.config import ModelConfig

SIDES = ("no cache", "cache", "slow store")


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    prompt: int = 0
    hit: int = 0

    def add(self, completion) -> None:
        self.ttft.append(completion.ttft_s)
        self.prompt += completion.server_usage.prompt_tokens
        self.hit += completion.server_usage.prompt_cache_hit_tokens


def tokens(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


async def conversation(client, system: list[int], vocab: int, seed: int, args, tally: Tally,
                       tag: str) -> None:
    history = list(system)
    for turn in range(args.turns):
        history += tokens(vocab, args.turn_tokens, seed * 100 + turn)
        done = await client.generate(f"{tag}-c{seed}-t{turn}", prompt_ids=history,
                                     params=SamplingParams(max_tokens=args.max_tokens,
                                                           ignore_eos=True))
        tally.add(done)
        history += done.token_ids


async def workload(endpoint: str, system, vocab, round_: int, args, tally: Tally, tag: str):
    async with InferenceClient(endpoint) as client:
        await asyncio.gather(*(conversation(client, system, vocab, round_ * 1000 + c, args,
                                            tally, tag)
                               for c in range(args.conversations)))


def spec(args, cache_dir: str | None, slow: bool) -> ClusterSpec:
    extra = {"prefill": ("--kv-cache-read-delay-s", str(args.read_delay_ms / 1000))} \
        if slow else {}
    return ClusterSpec(model=args.model, prefill=1, decode=1,
                       expert_workers=args.expert_workers, kv_blocks=512, ledger=False,
                       kv_cache_dir=cache_dir or "", extra=extra,
                       kv_cache_memory_bytes=0 if slow else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/v3-mini")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system-tokens", type=int, default=384)
    ap.add_argument("--turn-tokens", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--expert-workers", type=int, default=2)
    ap.add_argument("--read-delay-ms", type=float, default=200.0)
    args = ap.parse_args(argv)
    vocab = ModelConfig.from_dir(args.model).vocab_size
    system = tokens(vocab, args.system_tokens, seed=1)
    tallies = {side: Tally() for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="epserve-bench-kv-") as tmp:
        clusters = {}
        try:
            for side, cache, slow in (("no cache", None, False), ("cache", f"{tmp}/fast", False),
                                      ("slow store", f"{tmp}/slow", True)):
                t0 = time.perf_counter()
                clusters[side] = LocalCluster(spec(args, cache, slow)).start(timeout=300)
                print(f"{side}: cluster up in {time.perf_counter() - t0:.1f}s", flush=True)
            for r in range(args.rounds):
                for side in SIDES:
                    t0 = time.perf_counter()
                    asyncio.run(workload(clusters[side].router_endpoint, system, vocab, r, args,
                                         tallies[side], f"r{r}-{side.replace(' ', '-')}"))
                    print(f"  round {r} {side:10s} {time.perf_counter() - t0:6.1f}s", flush=True)
        finally:
            for c in clusters.values():
                c.stop()
    base = statistics.median(tallies["no cache"].ttft)
    print(f"\n{args.conversations} conversations x {args.turns} turns x {args.rounds} rounds, "
          f"system prompt {args.system_tokens} tokens, {args.turn_tokens} per user turn")
    print(f"{'':12s} {'hit rate':>9s} {'TTFT p50 ms':>12s} {'vs none':>8s} "
          f"{'prompt tok/s of TTFT':>21s}")
    for side in SIDES:
        t = tallies[side]
        p50 = statistics.median(t.ttft)
        rate = t.prompt / sum(t.ttft)
        print(f"{side:12s} {t.hit / t.prompt:9.1%} {p50 * 1e3:12.1f} {p50 / base:7.2f}x "
              f"{rate:21,.0f}")
        key = side.replace(" ", "_")
        record("prefix_cache", f"{key}_hit_rate", round(t.hit / t.prompt, 4))
        record("prefix_cache", f"{key}_ttft_p50_vs_no_cache", round(p50 / base, 4))
        record("prefix_cache", f"{key}_prompt_tok_per_ttft_s", round(rate, 1))
    slow = statistics.median(tallies["slow store"].ttft) / base
    verdict = "met" if slow <= 1.05 else "NOT met"
    print(f"slow store TTFT p50 {slow:.2f}x of no cache: target <= 1.05x {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
