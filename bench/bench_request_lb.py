"""Request load balancers against round-robin on a synthetic heavy-tailed trace.

Prefill: 8 instances, each works through the prompts it holds first-in first-out at a fixed
compute rate (cost of a prompt = L^2 attention + L token work, scaled so the cluster runs at
~85% utilisation). Decode: 8 instances with a fixed KV capacity; every running request adds one
token per step and leaves after its (heavy-tailed, unknown to the router) output length.
Instances report their load every few steps, so reports are stale, as in the real system.

Measured: time-averaged max/mean load over instances (1.00 = perfectly even), the worst
instance's peak, and for prefill the time requests spend waiting (what imbalance costs users).

Run: .venv/bin/python -m bench.bench_request_lb
"""

from __future__ import annotations

import argparse
import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench import results
from services.balance.decode_lb import DecodeBalancer, DecodeBalancerConfig, DecodeInstanceLoad
from services.balance.prefill_lb import PrefillBalancer, PrefillInstanceLoad

INSTANCES = 8
REPORT_EVERY = 5  # steps between an instance's load reports
BLOCK_TOKENS = 64


def prompt_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Heavy-tailed prompt lengths: lognormal, median 1000 tokens, clipped to 16..32768."""
    return np.clip(rng.lognormal(math.log(1000), 1.3, n), 16, 32768).astype(np.int64)


def output_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Heavy-tailed output lengths: lognormal, median 300 tokens, clipped to 1..8192."""
    return np.clip(rng.lognormal(math.log(300), 1.0, n), 1, 8192).astype(np.int64)


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, instances, *_args) -> str:
        ids = sorted(i.instance_id for i in instances)
        chosen = ids[self._next % len(ids)]
        self._next += 1
        return chosen

    def on_dispatched(self, *_args) -> int:
        return 0

    def on_finished(self, _request_id: str) -> None:
        return None


class WithoutLedger:
    """A balancer that forgets what it sent: it sees only the (stale) reports, so between two
    reports it keeps choosing the instance that looked idlest (herding)."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def choose(self, *args) -> str:
        return self._inner.choose(*args)

    def on_dispatched(self, *_args) -> int:
        return 0

    def on_finished(self, _request_id: str) -> None:
        return None


@dataclass
class Stats:
    maxima: dict[str, list[float]] = field(default_factory=dict)
    means: dict[str, list[float]] = field(default_factory=dict)
    waits: list[int] = field(default_factory=list)

    def sample(self, name: str, per_instance: list[float]) -> None:
        self.maxima.setdefault(name, []).append(max(per_instance))
        self.means.setdefault(name, []).append(sum(per_instance) / len(per_instance))

    def ratio(self, name: str) -> float:
        """Time-averaged max over time-averaged mean: moments when the cluster is nearly idle
        (where max/mean of a few tiny loads means nothing) weigh as little as they matter."""
        return float(np.sum(self.maxima[name]) / np.sum(self.means[name]))

    def peak(self, name: str) -> float:
        return float(np.max(self.maxima[name]))


# ---- prefill ----------------------------------------------------------------------------------


def simulate_prefill(
    balancer_factory: Callable, steps: int, seed: int, ack: bool, report_every: int
) -> Stats:
    rng = np.random.default_rng(seed)
    ids = [f"prefill-{i}" for i in range(INSTANCES)]
    queues: dict[str, deque] = {i: deque() for i in ids}  # [request id, len, remaining, seq, t0]
    seen_seq = dict.fromkeys(ids, 0)
    reports = {i: PrefillInstanceLoad(i, acked_seq=0 if ack else None) for i in ids}
    # Cost units per step per instance, sized for ~85% utilisation of the mean arrival cost.
    rate = 2.0  # arrivals per step
    sample = prompt_lengths(np.random.default_rng(seed + 1), 200_000).astype(np.float64)
    mean_cost = float(np.mean(sample**2 / 4096 + sample))
    capacity = rate * mean_cost / (0.85 * INSTANCES)
    balancer = balancer_factory()
    stats = Stats()
    counter = 0
    for step in range(steps):
        for length in prompt_lengths(rng, rng.poisson(rate)):
            request_id = f"r{counter}"
            counter += 1
            target = balancer.choose(list(reports.values()), int(length))
            seq = balancer.on_dispatched(target, request_id, int(length))
            queues[target].append([request_id, int(length), length**2 / 4096 + length, seq, step])
        for instance_id, queue in queues.items():
            budget = capacity
            while queue and budget > 0:
                head = queue[0]
                used = min(budget, head[2])
                head[2] -= used
                budget -= used
                seen_seq[instance_id] = max(seen_seq[instance_id], head[3])
                if head[2] <= 1e-9:
                    queue.popleft()
                    balancer.on_finished(head[0])
                    stats.waits.append(step - head[4])
            for item in queue:
                seen_seq[instance_id] = max(seen_seq[instance_id], item[3])
        if step % report_every == 0:
            for instance_id, queue in queues.items():
                reports[instance_id] = PrefillInstanceLoad(
                    instance_id,
                    queued_tokens=sum(item[1] for item in queue),
                    attention_cost=float(sum(item[1] ** 2 for item in queue)),
                    acked_seq=seen_seq[instance_id] if ack else None,
                )
        stats.sample("attention", [float(sum(q[1] ** 2 for q in queues[i])) for i in ids])
        stats.sample("tokens", [float(sum(q[1] for q in queues[i])) for i in ids])
        stats.sample("work", [float(sum(q[2] for q in queues[i])) for i in ids])
    return stats


# ---- decode -----------------------------------------------------------------------------------


def simulate_decode(
    balancer_factory: Callable, steps: int, seed: int, ack: bool, report_every: int
) -> Stats:
    rng = np.random.default_rng(seed)
    ids = [f"decode-{i}" for i in range(INSTANCES)]
    total_blocks = 6000
    running: dict[str, list] = {i: [] for i in ids}  # [request id, prompt, generated, output, seq]
    seen_seq = dict.fromkeys(ids, 0)
    reports = {
        i: DecodeInstanceLoad(i, 0, total_blocks, 0, acked_seq=0 if ack else None) for i in ids
    }
    balancer = balancer_factory()
    stats = Stats()
    rate = 0.9  # arrivals per step: ~0.9 * 420 mean output steps = ~380 running requests
    counter = 0
    for step in range(steps):
        n = rng.poisson(rate)
        for prompt, output in zip(prompt_lengths(rng, n), output_lengths(rng, n), strict=True):
            request_id = f"r{counter}"
            counter += 1
            target = balancer.choose(list(reports.values()), int(prompt), 4096)
            seq = balancer.on_dispatched(target, request_id, int(prompt), 4096)
            running[target].append([request_id, int(prompt), 0, int(output), seq])
            seen_seq[target] = max(seen_seq[target], seq)
        for requests in running.values():
            for request in requests:
                request[2] += 1
            for request in [r for r in requests if r[2] >= r[3]]:
                requests.remove(request)
                balancer.on_finished(request[0])
        blocks = {i: sum(-(-(r[1] + r[2]) // BLOCK_TOKENS) for r in running[i]) for i in ids}
        if step % report_every == 0:
            for i in ids:
                reports[i] = DecodeInstanceLoad(
                    i,
                    blocks[i],
                    total_blocks,
                    len(running[i]),
                    acked_seq=seen_seq[i] if ack else None,
                )
        if step >= steps // 10:  # skip the warm-up while the cluster fills
            stats.sample("kv_blocks", [float(blocks[i]) for i in ids])
            stats.sample("requests", [float(len(running[i])) for i in ids])
    return stats


# ---- table ------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_request_lb", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6000, help="simulated steps per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(
        f"{INSTANCES} instances, reports every {REPORT_EVERY} steps, {args.steps} steps, "
        f"seed {args.seed}; max/mean = time-averaged max over instances / mean (1.00 = even)"
    )

    def decode_balancer() -> DecodeBalancer:
        return DecodeBalancer(DecodeBalancerConfig(block_tokens=BLOCK_TOKENS))

    def policies(balancer: Callable) -> list[tuple[str, Callable, bool, int]]:
        return [
            ("round-robin", RoundRobin, False, REPORT_EVERY),
            (
                "least-loaded on reports, no ledger",
                lambda: WithoutLedger(balancer()),
                True,
                REPORT_EVERY,
            ),
            ("balancer, ledger, no acks", balancer, False, REPORT_EVERY),
            ("balancer, ledger + acks", balancer, True, REPORT_EVERY),
            ("  reference: fresh reports every step", balancer, True, 1),
        ]

    print("\nprefill: load = prompts held (queued or in progress); wait in steps")
    header = (
        f"{'policy':38} {'attn max/mean':>13} {'tok max/mean':>12} "
        f"{'work max/mean':>13} {'mean wait':>9} {'p99 wait':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, factory, ack, every in policies(PrefillBalancer):
        stats = simulate_prefill(factory, args.steps, args.seed, ack, every)
        waits = np.asarray(stats.waits)
        print(
            f"{name:38} {stats.ratio('attention'):>13.3f} {stats.ratio('tokens'):>12.3f} "
            f"{stats.ratio('work'):>13.3f} {waits.mean():>9.1f} {np.percentile(waits, 99):>8.0f}"
        )
        key = f"prefill_{_slug(name)}"
        results.record("request_lb", f"{key}_attention_max_over_mean",
                       round(stats.ratio("attention"), 4))
        results.record("request_lb", f"{key}_mean_wait_steps", round(float(waits.mean()), 2))

    print("\ndecode: load = running requests and their KV blocks (capacity 6000 blocks each)")
    header = (
        f"{'policy':38} {'kv max/mean':>11} {'req max/mean':>12} "
        f"{'peak kv use':>11} {'peak reqs':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, factory, ack, every in policies(decode_balancer):
        stats = simulate_decode(factory, args.steps, args.seed, ack, every)
        print(
            f"{name:38} {stats.ratio('kv_blocks'):>11.3f} {stats.ratio('requests'):>12.3f} "
            f"{stats.peak('kv_blocks') / 6000:>10.0%} {stats.peak('requests'):>9.0f}"
        )
        results.record("request_lb", f"decode_{_slug(name)}_kv_max_over_mean",
                       round(stats.ratio("kv_blocks"), 4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
