"""`make run`: the main job on the built-in small model.

Runs the reference engine on a few prompts and prints throughput and expert load.
(The distributed cluster's demo replaces this once the services exist.)
"""

from __future__ import annotations

import argparse
import sys

import torch

from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.loader import load_model
from services.model.tokenizer import Tokenizer

PROMPTS = (
    "The mixture of experts routes each token to",
    "Prefill and decode run on separate machines because",
    "In 2025 DeepSeek reported a cost-profit margin of",
    "def expert_parallel(tokens, experts):",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = Tokenizer.from_dir(args.model)
    model = load_model(args.model)
    engine = ReferenceEngine(model)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    requests = [GenerationRequest(f"demo-{i}", tok.encode(p), params) for i, p in enumerate(PROMPTS)]
    completions = engine.generate(requests)
    for prompt, c in zip(PROMPTS, completions, strict=True):
        print(f"> {prompt}\n  {tok.decode(c.token_ids, skip_special_tokens=True)!r}")
    s = engine.stats
    print(f"\nprefill: {s.prefill_tokens} tokens, {s.prefill_tok_s:,.0f} tok/s")
    print(f"decode:  {s.decode_tokens} tokens in {s.decode_steps} steps, {s.decode_tok_s:,.1f} tok/s")
    print("\nrouted-expert tokens per MoE layer (min / mean / max over experts):")
    for layer, bank in model.expert_banks().items():
        c = bank.token_counts.float()
        print(f"  layer {layer}: {int(c.min())} / {c.mean():.1f} / {int(c.max())}"
              f"  ({int((c == 0).sum())} idle of {c.numel()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
