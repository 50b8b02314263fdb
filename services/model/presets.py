"""Small model shapes that run on a CPU. Each is a complete DeepSeek config.json.

- tiny: a few hundred thousand parameters for fast tests (16 experts, 4 groups).
- v3-mini: DeepSeek-V3's routing topology exactly (256 routed experts, 8 active, 8 groups with
  4 chosen, 1 shared expert, sigmoid gate with correction bias, MLA with q-LoRA, first layer
  dense, YaRN rope) at hidden size 256: about 40M parameters.
- v3-wide: a compute-dominated shape for the data-plane benchmarks (issue 15): hidden 1024
  with DeepSeek-V3's layer structure but fewer experts (16 routed, top-4, 4 groups with 2
  chosen) and layers (1 dense + 6 MoE), so a token's expert work outweighs the per-message
  Python overhead that dominates at hidden 256, and most of a step's compute sits in MoE layers
  as in V3 (58 of 61), where overlap can hide communication behind it: about 190M parameters.
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "rope_interleave": True,
    "use_cache": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
    },
    "v3-mini": {
        **_COMMON,
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 768,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "n_shared_experts": 1,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "torch_dtype": "bfloat16",
    },
    "v3-wide": {
        **_COMMON,
        "vocab_size": 4096,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 7,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
    },
}
