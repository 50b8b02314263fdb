"""A checkpoint with DeepSeek-V3's MTP layer, as V3 ships it (layer N after the last, with
its own embedding and head copies): transformers loads it (the layer is an unexpected key it
skips) and generates greedily; the reference engine with MTP speculative decoding gives the
same ids (near-tie rule)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from services.engine.compare import assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine, mtp_drafter
from services.engine.sampling import SamplingParams
from services.model.loader import load_model
from tests.parity.hf_models import hf_greedy

NEW_TOKENS = 24
PROMPTS = [[3, 4, 5, 6, 7], [100, 7], [9, 200, 31, 4, 17, 18, 19, 250, 2]]


def test_mtp_speculative_greedy_equals_transformers(tiny_mtp_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_mtp_model_dir, dtype=torch.float32).eval()
    want_tokens, want_logits = hf_greedy(hf, PROMPTS, NEW_TOKENS)
    model = load_model(tiny_mtp_model_dir, mtp=True)
    eng = ReferenceEngine(model, record_logits=True, drafter=mtp_drafter(model))
    got = eng.generate([GenerationRequest(f"p{i}", p, SamplingParams(
        max_tokens=NEW_TOKENS, ignore_eos=True)) for i, p in enumerate(PROMPTS)])
    assert_same_greedy(want_tokens, [c.token_ids for c in got], want_logits,
                       [c.logits for c in got])
    assert eng.stats.drafts.proposed[0] > 0
