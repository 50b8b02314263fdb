"""Multi-head latent attention (MLA) over a compressed KV cache.

The cache holds, per token per layer, the normalised latent c_kv [r] and the rotated shared key
k_pe [p] (r = kv_lora_rank, p = qk_rope_head_dim): latent_dim = r + p values, not 2*h*d.
Two mathematically equal paths:
- expanded (prefill, and the naive reference): up-project the latents to per-head K and V;
- absorbed (decode): fold kv_b_proj's key half into the query and its value half into the
  output, so attention runs directly against the latents.
Legend: T new tokens, L context length, h heads, n qk_nope_head_dim, v v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.model.batch import AttentionBatch
from services.model.config import ModelConfig
from services.model.layers import RMSNorm
from services.model.rope import RotaryEmbedding, softmax_scale


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache rows at slots [..., L] -> [..., L, r+p]. index_select, not cache[slots]: on a CPU
    advanced indexing costs several times more for the same copy."""
    rows = cache.index_select(0, slots.reshape(-1).to(cache.device))
    return rows.view(*slots.shape, cache.shape[-1])


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.qk_dim = cfg.qk_head_dim
        h, H = self.num_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, h * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * self.qk_dim, bias=False)
        self.q_lora = cfg.q_lora_rank is not None
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, H, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg.rope, self.qk_dim)
        self.mode = "auto"  # "auto" | "expanded" (force the naive path, for tests)

    # ATTN-0 in DeepSeek's decode pipeline: projections, rope, cache write.
    def project(
        self, x: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor, rotary: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(T, self.num_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        cos, sin = cos_sin
        q_pe = rotary.apply(q_pe, cos, sin)
        ckv = self.kv_a_proj_with_mqa(x)
        c, k_pe = ckv.split([self.rank, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)
        k_pe = rotary.apply(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        latent = torch.cat([c, k_pe], dim=-1).to(cache.dtype)
        cache.index_copy_(0, batch.write_slots.to(cache.device), latent)
        return q_nope, q_pe

    # ATTN-1: core attention and output projection.
    def attend(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor,
        decode_step: bool | None = None,
    ) -> torch.Tensor:
        """decode_step: whether the step this batch is part of is a decode step (None: decide
        from this batch). The absorbed path runs only in a decode step with mode "auto"; a
        micro-batch of one-token sequences inside a prefill step passes False and keeps the
        step's expanded path, so splitting a step changes no arithmetic."""
        decode = batch.is_decode if decode_step is None else decode_step
        if decode and not batch.is_decode:
            raise ValueError("decode_step=True needs one new token per sequence or a "
                             "speculative batch")
        if decode and self.mode == "auto":
            out = self._absorbed(q_nope, q_pe, batch, cache)
        else:
            out = self._expanded(q_nope, q_pe, batch, cache)
        return self.o_proj(out.reshape(out.shape[0], -1))

    def forward(
        self, x: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor, rotary: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q_nope, q_pe = self.project(x, batch, cache, rotary, cos_sin)
        return self.attend(q_nope, q_pe, batch, cache)

    def _expanded(self, q_nope, q_pe, batch: AttentionBatch, cache: torch.Tensor) -> torch.Tensor:
        # Sequences with the same (new tokens, context length) are attended as one batch G: a
        # prefill of equal-length prompts is one pass per layer, not one per sequence.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (n, slots) in enumerate(zip(batch.query_lens, batch.context_slots, strict=True)):
            groups.setdefault((n, slots.numel()), []).append(i)
        starts = [0]
        for n in batch.query_lens:
            starts.append(starts[-1] + n)
        h, d = self.num_heads, self.qk_dim
        q_all = torch.cat([q_nope, q_pe], dim=-1)  # [T, h, d]
        out = q_nope.new_empty(q_nope.shape[0], h, self.v_dim)
        for (n, L), seqs in groups.items():
            G = len(seqs)
            rows = (slice(None) if len(groups) == 1 else  # every token, in order
                    torch.cat([torch.arange(starts[i], starts[i] + n) for i in seqs]))  # [G*n]
            slots = torch.stack([batch.context_slots[i] for i in seqs])  # [G, L]
            latent = _gather(cache, slots).to(q_nope.dtype)  # [G, L, r+p]
            c, k_pe = latent[..., : self.rank], latent[..., self.rank :]
            kv = self.kv_b_proj(c).view(G, L, h, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [G, L, h, *]
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, h, -1)], dim=-1)
            q = q_all[rows].view(G, n, h, d).transpose(1, 2)  # [G, h, n, d]
            scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * self.scale  # [G, h, n, L]
            positions = batch.positions[rows].view(G, n, 1)
            # context index of each query: a context ends at its sequence's last new token
            # and need not start at position 0 (SeqChunk.context_from)
            at = positions - (positions[:, -1:] - (L - 1))
            mask = (torch.arange(L)[None, None, :] > at).to(scores.device)  # [G, n, L]
            scores = scores.masked_fill(mask[:, None], float("-inf"))
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(probs, v.transpose(1, 2))  # [G, h, n, v]
            out[rows] = o.transpose(1, 2).reshape(G * n, h, self.v_dim)
        return out

    def _absorbed(self, q_nope, q_pe, batch: AttentionBatch, cache: torch.Tensor) -> torch.Tensor:
        slots, pad = batch.token_context  # [T, L]: one query per new token
        latent = _gather(cache, slots).to(q_nope.dtype)  # [T, L, r+p], laid out [c | k_pe]
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [h, n, r], [h, v, r]
        # bmm, not einsum: the same matmuls without einsum's planning on every call.
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, h, r]
        # q_lat.c + q_pe.k_pe is one dot product of [q_lat | q_pe] with the cached row.
        q = torch.cat([q_lat, q_pe], dim=-1)  # [T, h, r+p]
        scores = torch.bmm(q, latent.transpose(1, 2)) * self.scale  # [T, h, L]
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, :].to(scores.device), float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
        o_lat = torch.bmm(probs, latent[..., : self.rank])  # [T, h, r]
        return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, h, v]
