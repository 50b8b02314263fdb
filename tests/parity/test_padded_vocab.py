"""A checkpoint whose tokenizer knows fewer ids than config.json's vocab_size, as DeepSeek-V3's.

The reference engine generates greedily, emits ids past the tokenizer, and agrees with
transformers' greedy ids; every id decodes (the unknown ones to ""), in one go and streamed,
exactly as transformers' tokenizer decodes them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine.compare import assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.checkpoint_gen import make_model
from services.model.detokenizer import IncrementalDetokenizer
from services.model.loader import load_model
from services.model.tokenizer import Tokenizer
from tests.parity.hf_models import hf_greedy

TOKENIZER_SIZE = 400  # the tiny preset's vocab_size is 512
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    out = make_model("tiny", tmp_path_factory.mktemp("padded"), seed=0,
                     tokenizer_size=TOKENIZER_SIZE)
    return out, Tokenizer.from_dir(out)


def test_generator_writes_a_smaller_tokenizer(padded):
    out, tok = padded
    assert tok.vocab_size == TOKENIZER_SIZE == len(AutoTokenizer.from_pretrained(out))
    assert load_model(out).cfg.vocab_size == 512
    with pytest.raises(ValueError, match="tokenizer_size"):
        make_model("tiny", out / "never", tokenizer_size=513)


def test_greedy_ids_past_the_tokenizer_decode_like_transformers(padded):
    out, tok = padded
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompts = [tok.encode(text) for text in ("Hello there", "The quick brown fox", "42 + 7 =")]
    prompts.append([tok.bos_id, 450, 3, 511, 9])  # the router admits ids below vocab_size
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want_tokens, want_logits = hf_greedy(hf, prompts, NEW_TOKENS)
    engine = ReferenceEngine(load_model(out), record_logits=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    got = engine.generate([GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    result = assert_same_greedy(want_tokens, [c.token_ids for c in got], want_logits,
                                [c.logits for c in got])
    assert result.exact >= len(prompts) - 1, "more than one near-tie: suspicious"

    generated = [t for c in got for t in c.token_ids]
    assert any(t >= TOKENIZER_SIZE for t in generated), "no unknown id generated: nothing tested"
    for c in got:
        for skip in (False, True):
            text = tok.decode(c.token_ids, skip_special_tokens=skip)
            assert text == hf_tok.decode(c.token_ids, skip_special_tokens=skip)
            detok = IncrementalDetokenizer(tok, c.prompt_ids, skip_special_tokens=skip)
            streamed = [detok.push(t) for t in c.token_ids] + [detok.flush()]
            assert "".join(streamed) == text
        assert all(tok.decode([t]) == "" for t in c.token_ids if t >= TOKENIZER_SIZE)
