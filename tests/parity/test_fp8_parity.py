"""An FP8 checkpoint (`make-model --fp8`) in epserve against transformers' DeepseekV3 fed the
same weights dequantised independently (tests/fp8_reference.py): prefill logits within
LOGIT_TOL and identical greedy tokens (near-tie rule).

transformers is not asked to load the FP8 files itself: on a CPU its FP8 path needs
accelerate, and it takes the block size from how the scale grid divides the weight, which
partial blocks (64 rows in blocks of 24) do not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.engine.compare import LOGIT_TOL, assert_same_greedy
from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.checkpoint_gen import make_model
from services.model.loader import load_model
from tests.fp8_reference import write_dequantized_copy
from tests.parity.hf_models import hf_greedy

PROMPTS = ([3, 17, 250, 9, 44, 101, 7], [12, 300], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [400])
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=[24, 128])  # several partial blocks; one per weight
def pair(request, tmp_path_factory):
    out = make_model("tiny", tmp_path_factory.mktemp(f"fp8b{request.param}"), seed=0,
                     fp8_block=request.param)
    copy = write_dequantized_copy(out, tmp_path_factory.mktemp(f"deq{request.param}"))
    hf = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).eval()
    return hf, load_model(out)


def _logits(model, prompt):
    cache = LatentKVCache(model.cfg.num_hidden_layers, model.cfg.latent_dim, 4, 16)
    batch = cache.batch([SeqChunk("p", 0, len(prompt))])
    return model(torch.tensor(prompt), batch, cache.layers, all_logits=True)


def test_prefill_logits_match(pair, tiny_model_dir):
    hf, ours = pair
    plain = load_model(tiny_model_dir)
    for prompt in PROMPTS:
        got = _logits(ours, prompt)
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].float()
        assert (got - want).abs().max().item() < LOGIT_TOL
        # quantisation moved the model: agreeing with the unquantised one would prove nothing
        assert (got - _logits(plain, prompt)).abs().max().item() > 100 * LOGIT_TOL


def test_greedy_generation_matches(pair):
    hf, ours = pair
    want_tokens, want_logits = hf_greedy(hf, PROMPTS, NEW_TOKENS)
    engine = ReferenceEngine(ours, block_size=16, record_logits=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    got = engine.generate([GenerationRequest(f"r{i}", p, params) for i, p in enumerate(PROMPTS)])
    assert all(len(c.token_ids) == NEW_TOKENS for c in got)
    result = assert_same_greedy(want_tokens, [c.token_ids for c in got], want_logits,
                                [c.logits for c in got])
    assert result.exact >= len(PROMPTS) - 1, "more than one near-tie: suspicious"
