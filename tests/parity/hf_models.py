"""Tiny random transformers DeepseekV3/DeepseekV2 models, re-initialised to useful scales.

transformers' default init (std 0.02) makes attention nearly uniform and logits nearly tied,
which would hide bugs; we redraw every weight at ~1/sqrt(fan_in) so every code path matters.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, max_position_embeddings=256,
    bos_token_id=0, eos_token_id=1, pad_token_id=2,
)


def yarn(factor=4.0, mscale=1.0, mscale_all_dim=1.0, original=64):
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "mscale": mscale,
            "mscale_all_dim": mscale_all_dim, "original_max_position_embeddings": original,
            "beta_fast": 32.0, "beta_slow": 1.0}


# Each case differs in a feature the model must honour.
CASES = {
    "v3-qlora-groups": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True)),
    "v3-no-qlora-yarn": ("v3", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                    rope_parameters=yarn())),
    "v3-half-rope-yarn-mscale": ("v3", dict(q_lora_rank=24, n_group=2, topk_group=1,
                                            rope_interleave=False,
                                            rope_parameters=yarn(8.0, 0.707, 1.0))),
    "v2-lite-greedy-yarn": ("v2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                       routed_scaling_factor=1.5, rope_parameters=yarn(2.0, 0.5, 0.5))),
    "v2-group-limited": ("v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                    topk_group=2)),
}


def reinit_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                gain = 4.0 if "lm_head" in name else 2.0 if "gate.weight" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=g))


def build(case: str, out: Path, seed: int = 0):
    family, overrides = CASES[case]
    if family == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, **overrides}))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**BASE, **overrides}))
    reinit_(model, seed)
    model.eval()
    model.save_pretrained(out)
    return model


def hf_greedy(hf, prompts: list[list[int]], new_tokens: int
              ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """transformers' greedy generation of each prompt alone (EOS never stops it): the new ids
    and the fp32 logits each came from, what assert_same_greedy compares against."""
    hf.generation_config.eos_token_id = None
    tokens, logits = [], []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              pad_token_id=2)
        tokens.append(out.sequences[0, len(p):].tolist())
        logits.append([row[0].float() for row in out.logits])
    return tokens, logits
