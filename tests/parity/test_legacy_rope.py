"""A config.json in the layout DeepSeek-V3 ships (transformers-4: `rope_theta` beside a
`rope_scaling` block whose kind is under "type"): it parses to the same rope as the
transformers-5 layout (`rope_parameters`), and the model it configures generates
transformers' greedy ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.engine.compare import assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.checkpoint_gen import make_model
from services.model.config import ModelConfig
from services.model.loader import load_model
from tests.parity.hf_models import hf_greedy

# DeepSeek-V3's own block, scaled to tiny's context (V3: factor 40 over 4096 positions)
LEGACY = {"beta_fast": 32, "beta_slow": 1, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
          "original_max_position_embeddings": 128, "type": "yarn"}


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory):
    out = make_model("tiny", tmp_path_factory.mktemp("legacy_rope"), seed=0)
    raw = json.loads((out / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw["rope_theta"] = 10000.0
    raw["rope_scaling"] = LEGACY
    (out / "config.json").write_text(json.dumps(raw))
    return out


def test_legacy_and_new_layouts_parse_alike(legacy_dir):
    raw = json.loads((legacy_dir / "config.json").read_text())
    new = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_theta")}
    params = {k: v for k, v in LEGACY.items() if k != "type"}
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **params}
    legacy_cfg = ModelConfig.from_dir(legacy_dir)
    assert legacy_cfg.rope == ModelConfig.from_dict(new).rope
    assert legacy_cfg.rope.kind == "yarn" and legacy_cfg.rope.factor == 4.0


def test_legacy_rope_greedy_equals_transformers(legacy_dir):
    prompts = [[3, 4, 5, 6, 7, 8], [100, 200, 150] * 30]  # the second passes 128 positions
    hf = AutoModelForCausalLM.from_pretrained(legacy_dir, dtype=torch.float32).eval()
    want, want_logits = hf_greedy(hf, prompts, 20)
    got = ReferenceEngine(load_model(legacy_dir), record_logits=True).generate(
        [GenerationRequest(f"p{i}", p, SamplingParams(max_tokens=20, ignore_eos=True))
         for i, p in enumerate(prompts)])
    assert_same_greedy(want, [c.token_ids for c in got], want_logits, [c.logits for c in got])
