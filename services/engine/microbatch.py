"""How one step's batch becomes two micro-batches (pure: no I/O, no model).

A step's tokens lie end to end (sequence after sequence). A split is one cut at token index t:
micro-batch 0 takes tokens [0, t), micro-batch 1 takes [t, T). A cut inside a sequence splits
that prompt between the micro-batches, as DeepSeek does for prefill: micro-batch 1's part of it
attends to micro-batch 0's part, whose latent KV micro-batch 0 wrote into the cache at the same
layer first (the overlapped runtime keeps that order, services/engine/overlap.py). A decode
step has one token per sequence, so every cut there falls between sequences.

Policies (the scheduler's OverlapPlan.split_policy):
- "balanced_attention": the cut that minimises the larger micro-batch's attention-side compute,
  estimated per token from the model's shapes (CostModel): projections + shared expert + gate
  (the same for every token) plus core attention proportional to the token's context length,
  plus, in the expanded (prefill) path, the re-expansion of a split prompt's first part.
- "even_tokens": the cut at T // 2.
Below `min_batch_tokens` tokens (or with one token) the step runs as one micro-batch. Above it,
unless the plan is `fixed`, the engine's OverlapTuner (overlap_tuner.py) may still run a step as
one micro-batch, where its measurements say splitting a step of that size does not pay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.model.batch import AttentionBatch

SPLIT_POLICIES = ("balanced_attention", "even_tokens")


@dataclass(frozen=True)
class OverlapSettings:
    """The fields of the scheduler's OverlapPlan an engine reads (the proto has the same names)."""

    micro_batches: int = 1
    split_policy: str = "balanced_attention"
    min_batch_tokens: int = 16
    version: int = 0
    fixed: bool = False  # see OverlapPlan.fixed: False lets the engine's OverlapTuner decide

    def __post_init__(self) -> None:
        check_plan_fields(self)


def check_plan_fields(plan) -> None:
    """ValueError unless `plan` (OverlapSettings or an OverlapPlan proto) is usable."""
    if plan.micro_batches not in (1, 2):
        raise ValueError(f"micro_batches must be 1 or 2, got {plan.micro_batches}")
    if plan.split_policy not in SPLIT_POLICIES:
        raise ValueError(f"split_policy must be one of {list(SPLIT_POLICIES)}, "
                         f"got {plan.split_policy!r}")
    if plan.min_batch_tokens < 0:
        raise ValueError(f"min_batch_tokens must be >= 0, got {plan.min_batch_tokens}")


@dataclass(frozen=True)
class CostModel:
    """Attention-side compute of a micro-batch, in units of one (query token, context position)
    pair of core attention: each token costs `alpha + context_length`, and each sequence piece
    run through the expanded path costs `gamma * its context length` (kv_b_proj up-projection)."""

    alpha: float
    gamma: float = 0.0

    @classmethod
    def for_model(cls, cfg, decode: bool) -> CostModel:
        """Multiply-accumulates per token of a MoE layer, from the config's shapes."""
        H, h = cfg.hidden_size, cfg.num_attention_heads
        n, p, v, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = H * cfg.q_lora_rank + cfg.q_lora_rank * h * (n + p) if cfg.q_lora_rank else H * h * (n + p)
        shared = 3 * H * cfg.moe_intermediate_size * max(cfg.n_shared_experts or 0, 0)
        linear = q + H * (r + p) + h * v * H + shared + H * cfg.n_routed_experts
        if decode:  # absorbed: attention against the latents; W_UK / W_UV folded per token
            per_pair = h * (r + p) + h * r
            return cls(alpha=(linear + h * n * r + h * r * v) / per_pair, gamma=0.0)
        per_pair = h * (n + p) + h * v
        return cls(alpha=linear / per_pair, gamma=r * h * (n + v) / per_pair)


def sequence_offsets(query_lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(query_lens, dtype=np.int64))])


def _starts(batch: AttentionBatch, offsets: np.ndarray) -> np.ndarray:
    """Position of each sequence's first new token (its past length)."""
    if not len(batch.query_lens):
        return np.zeros(0, dtype=np.int64)
    return batch.positions[torch.as_tensor(offsets[:-1])].cpu().numpy().astype(np.int64)


def split_costs(query_lens, past, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """(cost of micro-batch 0, cost of micro-batch 1) for every cut t = 1 .. T-1."""
    qlens = np.asarray(query_lens, dtype=np.int64)
    past = np.asarray(past, dtype=np.int64)
    offsets = sequence_offsets(qlens)
    T = int(offsets[-1])
    seq_of = np.repeat(np.arange(len(qlens)), qlens)  # [T]
    local = np.arange(T) - offsets[seq_of]  # index of each token inside its sequence's piece
    ctx = past[seq_of] + local + 1  # context each token attends to
    W = np.concatenate([[0.0], np.cumsum(cost.alpha + ctx)])
    full_ctx = (past + qlens).astype(np.float64)
    ctx_before = np.concatenate([[0.0], np.cumsum(full_ctx)])  # sum of contexts of seqs < s
    t = np.arange(1, T)
    s, k = seq_of[t], local[t]  # the cut falls before token k of sequence s
    inside = k > 0
    exp0 = ctx_before[s] + np.where(inside, past[s] + k, 0)
    exp1 = ctx_before[-1] - ctx_before[s]  # seqs s.. (s whole, even when split: its full context)
    c0 = W[t] + cost.gamma * exp0
    c1 = (W[T] - W[t]) + cost.gamma * exp1
    return c0, c1


def choose_cut(query_lens, past, policy: str, cost: CostModel | None = None) -> int | None:
    """Token index t (0 < t < T) that splits the step in two, or None (one micro-batch)."""
    T = int(sum(query_lens))
    if T < 2:
        return None
    if policy == "even_tokens":
        return T // 2
    if policy != "balanced_attention":
        raise ValueError(f"unknown split policy {policy!r}")
    if cost is None:
        raise ValueError("balanced_attention needs a cost model")
    c0, c1 = split_costs(query_lens, past, cost)
    worst = np.maximum(c0, c1)
    # the smallest worst case; among (near-)equal ones the most even, then the cut nearest T/2
    best = worst.min()
    near = np.nonzero(worst <= best * (1 + 1e-9))[0]
    order = sorted(near, key=lambda i: (abs(c0[i] - c1[i]), abs(2 * (i + 1) - T)))
    return int(order[0]) + 1


def wants_split(num_tokens: int, plan) -> bool:
    return plan.micro_batches == 2 and num_tokens >= max(2, plan.min_batch_tokens)


def plan_cut(batch: AttentionBatch, plan, cfg) -> int | None:
    """The cut a plan asks for on this batch, or None to run it as one micro-batch."""
    if not wants_split(batch.num_tokens, plan):
        return None
    offsets = sequence_offsets(batch.query_lens)
    cost = CostModel.for_model(cfg, batch.is_decode) if plan.split_policy == "balanced_attention" else None
    return choose_cut(batch.query_lens, _starts(batch, offsets), plan.split_policy, cost)


def token_range_batch(batch: AttentionBatch, lo: int, hi: int) -> AttentionBatch:
    """The sub-batch of tokens [lo, hi): the pieces of every sequence in that range.

    A piece that ends before its sequence's last new token sees its context only up to its
    own last position (the rest is not written yet when it runs)."""
    if not 0 <= lo < hi <= batch.num_tokens:
        raise ValueError(f"bad token range [{lo}, {hi}) of {batch.num_tokens}")
    offsets = sequence_offsets(batch.query_lens)
    qlens, ctx = [], []
    for i, n in enumerate(batch.query_lens):
        a, b = max(lo, int(offsets[i])), min(hi, int(offsets[i]) + n)
        if a >= b:
            continue
        qlens.append(b - a)
        last_pos = int(batch.positions[b - 1])
        ctx.append(batch.context_slots[i][: last_pos + 1])
    return AttentionBatch(positions=batch.positions[lo:hi], query_lens=tuple(qlens),
                          context_slots=tuple(ctx), write_slots=batch.write_slots[lo:hi],
                          speculative=batch.speculative)


@dataclass(frozen=True)
class MicroBatch:
    index: int
    lo: int  # token range [lo, hi) of the step
    hi: int
    batch: AttentionBatch


def micro_batches(batch: AttentionBatch, cut: int | None) -> list[MicroBatch]:
    if cut is None:
        return [MicroBatch(0, 0, batch.num_tokens, batch)]
    return [MicroBatch(0, 0, cut, token_range_batch(batch, 0, cut)),
            MicroBatch(1, cut, batch.num_tokens, token_range_batch(batch, cut, batch.num_tokens))]
