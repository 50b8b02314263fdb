"""The reference engine against an independent implementation: transformers' DeepseekV3/V2.

Logits of a batch of prompts agree within LOGIT_TOL (fp32), and greedy generation of 32 tokens
with EOS ignored is identical (near-tie rule) for prompts of different lengths.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.compare import LOGIT_TOL, assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.batch import contiguous_batch
from services.model.loader import load_model
from tests.parity.hf_models import CASES, build, hf_greedy

PROMPT_LENS = (3, 11, 7, 1)
NEW_TOKENS = 32


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, out)
    return request.param, hf, load_model(out)


def test_prefill_logits_match(pair):
    case, hf, ours = pair
    prompts = _prompts(ours.cfg.vocab_size)
    stride = max(PROMPT_LENS)
    caches = [torch.zeros(len(prompts) * stride, ours.cfg.latent_dim)
              for _ in range(ours.cfg.num_hidden_layers)]
    batch = contiguous_batch([0] * len(prompts), [len(p) for p in prompts], stride)
    got = ours(torch.tensor([t for p in prompts for t in p]), batch, caches, all_logits=True)
    worst, start = 0.0, 0
    for p in prompts:
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        diff = (got[start : start + len(p)] - want).abs().max().item()
        worst, start = max(worst, diff), start + len(p)
    print(f"{case}: max |logit diff| = {worst:.2e} (tolerance {LOGIT_TOL})")
    assert worst < LOGIT_TOL


def test_greedy_generation_matches(pair):
    case, hf, ours = pair
    prompts = _prompts(ours.cfg.vocab_size, seed=2)
    want_tokens, want_logits = hf_greedy(hf, prompts, NEW_TOKENS)
    engine = ReferenceEngine(ours, block_size=16, record_logits=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    got = engine.generate([GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert all(len(c.token_ids) == NEW_TOKENS for c in got)
    print(case)
    result = assert_same_greedy(want_tokens, [c.token_ids for c in got], want_logits,
                                [c.logits for c in got])
    assert result.exact >= len(prompts) - 1, "more than one near-tie: suspicious"
