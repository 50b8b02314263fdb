"""The committed demo checkpoint (checkpoints/bard-moe) against transformers.

It is what the repository promises (a DeepSeek-V3 MoE under 25 MB of safetensors, with its
tokenizer), transformers loads it as it loads any DeepseekV3 checkpoint, tokenises like our
tokenizer, and its greedy tokens for text prompts equal the reference engine's (near-tie rule).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine.compare import assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.config import ModelConfig
from services.model.loader import load_model
from services.model.tokenizer import Tokenizer
from tests.parity.hf_models import hf_greedy

BARD = Path(__file__).resolve().parents[2] / "checkpoints" / "bard-moe"
PROMPTS = ("Romeo.\n", "BRUTUS.\nFriends, Romans,", "The serving system routes each token",
           "Juliet.\nO")
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def bard():
    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(BARD, dtype=torch.float32).eval()
    return hf, load_model(BARD), Tokenizer.from_dir(BARD)


def test_the_checkpoint_is_a_small_deepseek_v3_moe():
    cfg = ModelConfig.from_dir(BARD)
    assert (BARD / "model.safetensors").stat().st_size <= 25 * 2**20
    assert cfg.model_type == "deepseek_v3" and cfg.q_lora_rank and cfg.first_k_dense_replace >= 1
    assert cfg.n_routed_experts >= 64 and cfg.n_group > cfg.topk_group > 1
    assert cfg.n_shared_experts >= 1 and cfg.scoring_func == "sigmoid"
    assert cfg.topk_method == "noaux_tc"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "expert_loads.json", "train_summary.json"):
        assert (BARD / name).is_file(), name


def test_transformers_tokenises_like_ours():
    ours, theirs = Tokenizer.from_dir(BARD), AutoTokenizer.from_pretrained(BARD)
    for text in PROMPTS:
        assert ours.encode(text) == theirs(text)["input_ids"]
    chat = [{"role": "user", "content": "Speak the speech, I pray you."}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_greedy_tokens_match_transformers(bard):
    hf, ours, tok = bard
    prompts = [tok.encode(p) for p in PROMPTS]
    want_tokens, want_logits = hf_greedy(hf, prompts, NEW_TOKENS)
    engine = ReferenceEngine(ours, block_size=16, record_logits=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    got = engine.generate([GenerationRequest(f"b{i}", p, params) for i, p in enumerate(prompts)])
    result = assert_same_greedy(want_tokens, [c.token_ids for c in got], want_logits,
                                [c.logits for c in got])
    assert result.exact >= len(prompts) - 1, "more than one near-tie: suspicious"
    print([tok.decode(c.token_ids) for c in got])
