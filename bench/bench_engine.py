"""Reference engine vs transformers on the same checkpoint and prompts, side by side.

Prefill: one batched forward over the prompts, last-token logits only. Decode: greedy
generation of N tokens (EOS ignored); each side's decode time is its generate() time minus its
prefill time. Each measurement is repeated, alternating the two implementations, and the median
is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.results import record
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.loader import load_model


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/v3-mini")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ours = load_model(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, ours.cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    reqs = [GenerationRequest(f"b{i}", p.tolist(), params) for i, p in enumerate(prompts)]

    def ours_prefill():
        ReferenceEngine(ours).generate([GenerationRequest(r.request_id, r.prompt_ids,
                                                          SamplingParams(max_tokens=1)) for r in reqs])

    def hf_prefill():
        # Last-token logits only, as generate()'s own prefill computes them and as the engine's
        # prefill does; full [B, S, V] logits would charge transformers' prefill (and credit its
        # decode, measured as generate minus prefill) with an lm_head pass neither does.
        with torch.no_grad():
            hf(prompts, logits_to_keep=1)

    def ours_generate():
        ReferenceEngine(ours).generate(reqs)

    def hf_generate():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=2)

    ours_generate(), hf_generate()  # warm-up
    t = {k: [] for k in ("op", "hp", "og", "hg")}
    for _ in range(args.repeats):
        t["op"].append(_median_time(ours_prefill, 1))
        t["hp"].append(_median_time(hf_prefill, 1))
        t["og"].append(_median_time(ours_generate, 1))
        t["hg"].append(_median_time(hf_generate, 1))
    m = {k: statistics.median(v) for k, v in t.items()}
    prefill_tokens = args.batch * args.prompt_len
    decode_tokens = args.batch * (args.new_tokens - 1)
    ours_p, hf_p = prefill_tokens / m["op"], prefill_tokens / m["hp"]
    ours_d = decode_tokens / max(m["og"] - m["op"], 1e-9)
    hf_d = decode_tokens / max(m["hg"] - m["hp"], 1e-9)
    print(f"engine vs transformers — {args.model}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'phase':<10}{'epserve tok/s':>16}{'transformers tok/s':>22}{'ratio':>10}")
    print(f"{'prefill':<10}{ours_p:>16,.0f}{hf_p:>22,.0f}{ours_p / hf_p:>9.2f}x")
    print(f"{'decode':<10}{ours_d:>16,.0f}{hf_d:>22,.0f}{ours_d / hf_d:>9.2f}x")
    record("engine", "prefill_vs_transformers", round(ours_p / hf_p, 3))
    record("engine", "decode_vs_transformers", round(ours_d / hf_d, 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
