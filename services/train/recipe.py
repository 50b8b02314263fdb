"""What is trained: the demo model's DeepSeek-V3 config.json and the optimisation recipe.

bard-moe keeps every DeepSeek-V3 mechanism the serving system exercises (MLA with q-LoRA and
decoupled rope, one dense first layer, MoE layers with 64 routed experts, top-6 of them chosen
within 4 of 8 groups, one shared expert, a sigmoid gate with the correction bias of
auxiliary-loss-free balancing) at a size a 2-core CPU trains in about an hour: ~7.8M
parameters, ~15 MB as bf16 safetensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from services.model.presets import _COMMON

BARD_MOE: dict[str, Any] = {
    **_COMMON,
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 5,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 4,
    "n_shared_experts": 1,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
}

# A few-second model for tests: the same mechanisms, tiny widths.
TINY_TRAIN: dict[str, Any] = {
    **BARD_MOE,
    "vocab_size": 384,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": 256,
    "torch_dtype": "float32",
}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    # When set, the schedule runs on training time instead of steps: the cosine decays over
    # this many seconds of training and the run ends there (or at `steps`, whichever is first).
    # On a machine shared with other work the step rate is unknown in advance; a step-based
    # schedule would end early and undecayed or run long. Windows stay seeded per step.
    time_budget_s: float | None = None
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence after BOS
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # balance_bias.update_bias's step. DeepSeek-V3 used 0.001 over ~100k steps; a run of about
    # a thousand steps needs a faster bias, or the gate (lr 3e-3) collapses onto a few experts
    # before the bias catches up (seen at 0.001: per-step balancedness ~0.1 at step 200).
    bias_gamma: float = 1e-2
    init_std: float = 0.02
    seed: int = 0
    eval_every: int = 100  # steps between held-out evaluations
    eval_windows: int = 64  # held-out windows of seq_len scored each time
    checkpoint_every_s: float = 180.0  # wall-clock seconds between resumable checkpoints
    threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
