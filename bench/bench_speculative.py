"""MTP speculative decoding vs plain decoding, side by side, on the trained demo model.

The same greedy requests (the demo's prompts, batch B, N new tokens) are decoded plainly and
with the checkpoint's MTP layer drafting one token a step, alternating, by the reference
engine and by the EP engine over real expert-worker processes. Reported: the draft's
acceptance rate (position 1: the only one MTP drafts), tokens a sequence gains per decode step,
decode tokens/s of each and their ratio. The outputs must be identical (checked): speculation
changes how many tokens a step yields, never which.

A random-weight checkpoint's MTP layer drafts noise (acceptance ~1/vocab), so this benchmark
needs a checkpoint whose MTP layer was trained (checkpoints/bard-moe); without one it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from bench import results
from services.balance.naive import contiguous_placement
from services.engine.ep_client import ExpertClient
from services.engine.ep_engine import EPEngine
from services.engine.reference import GenerationRequest, ReferenceEngine, mtp_drafter
from services.engine.sampling import SamplingParams
from services.local.demo import PROMPTS
from services.local.expert_workers import LocalExpertWorkers
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model
from services.model.tokenizer import Tokenizer

NAME = "speculative"


def _requests(model_dir: str, batch: int, new_tokens: int) -> list[GenerationRequest]:
    tok = Tokenizer.from_dir(model_dir)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    return [GenerationRequest(f"s{i}", tok.encode(PROMPTS[i % len(PROMPTS)]), params)
            for i in range(batch)]


def _decode_rate(stats) -> float:
    return stats.decode_tokens / stats.decode_seconds if stats.decode_seconds else 0.0


def _reference(model, reqs, repeats: int) -> dict[str, list]:
    runs: dict[str, list] = {"plain": [], "mtp": []}
    for i in range(repeats + 1):  # the first round warms up, unrecorded
        for kind in runs:
            eng = ReferenceEngine(model, drafter=mtp_drafter(model) if kind == "mtp" else None)
            out = eng.generate(reqs)
            if i:
                runs[kind].append((_decode_rate(eng.stats), eng.stats.drafts, out))
    return runs


async def _ep(model_dir: str, reqs, workers: int, repeats: int) -> dict[str, list]:
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, experts=no_experts(cfg), mtp=True)
    table = contiguous_placement(cfg.n_routed_experts, workers, cfg.moe_layer_ids)
    runs: dict[str, list] = {"plain": [], "mtp": []}
    with LocalExpertWorkers(model_dir, table) as pool:
        client = await ExpertClient.connect(pool.endpoints)
        try:
            for i in range(repeats + 1):  # the first round warms up, unrecorded
                for kind in runs:
                    engine = EPEngine(model, client)
                    out = await engine.generate(
                        reqs, drafter=mtp_drafter(model) if kind == "mtp" else None)
                    if i:
                        runs[kind].append((_decode_rate(engine.stats), engine.stats.drafts,
                                           out))
        finally:
            await client.close()
    return runs


def _report(engine: str, runs: dict[str, list]) -> None:
    plain = [r[0] for r in runs["plain"]]
    mtp = [r[0] for r in runs["mtp"]]
    same = all([c.token_ids for c in p[2]] == [c.token_ids for c in m[2]]
               for p, m in zip(runs["plain"], runs["mtp"], strict=True))
    drafts = runs["mtp"][-1][1]
    speedup = statistics.median(mtp) / statistics.median(plain)
    print(f"{engine:10s} {statistics.median(plain):10.1f} {statistics.median(mtp):10.1f} "
          f"{speedup:8.2f}x {drafts.acceptance():11.3f} {drafts.tokens_per_step:12.2f} "
          f"{'yes' if same else 'NO'}")
    results.record(NAME, f"{engine}_decode_speedup", round(speedup, 3))
    results.record(NAME, f"{engine}_acceptance_pos1", round(drafts.acceptance(), 4))
    results.record(NAME, f"{engine}_tokens_per_step", round(drafts.tokens_per_step, 3))
    results.record(NAME, f"{engine}_outputs_identical", "yes" if same else "no")
    if not same:
        raise SystemExit(f"{engine}: speculative output differs from plain decoding")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="checkpoints/bard-moe",
                    help="a checkpoint with a trained MTP layer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="expert workers of the EP run")
    args = ap.parse_args(argv)
    cfg = ModelConfig.from_dir(args.model)
    if not cfg.num_nextn_predict_layers:
        print(f"{args.model} has no MTP layer: nothing to measure")
        results.record(NAME, "skipped", f"{args.model} has no MTP layer")
        return 0
    torch.manual_seed(0)
    reqs = _requests(args.model, args.batch, args.new_tokens)
    model = load_model(args.model, mtp=True)
    print(f"{args.model}: batch {args.batch}, {args.new_tokens} greedy tokens each, median of "
          f"{args.repeats} after a warm-up (plain and MTP alternating)")
    print(f"{'engine':10s} {'plain t/s':>10s} {'mtp t/s':>10s} {'speedup':>9s} "
          f"{'acceptance':>11s} {'tokens/step':>12s} same")
    t0 = time.perf_counter()
    _report("reference", _reference(model, reqs, args.repeats))
    _report("ep", asyncio.run(_ep(args.model, reqs, args.workers, args.repeats)))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
