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
        cache[batch.write_slots] = torch.cat([c, k_pe], dim=-1).to(cache.dtype)
        return q_nope, q_pe

    # ATTN-1: core attention and output projection.
    def attend(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor
    ) -> torch.Tensor:
        if batch.is_decode and self.mode == "auto":
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
        outs, start = [], 0
        for n, slots in zip(batch.query_lens, batch.context_slots, strict=True):
            positions = batch.positions[start : start + n]
            qn, qp = q_nope[start : start + n], q_pe[start : start + n]  # [n, h, *]
            start += n
            latent = cache[slots].to(q_nope.dtype)  # [L, r+p]
            c, k_pe = latent[:, : self.rank], latent[:, self.rank :]
            kv = self.kv_b_proj(c).view(-1, self.num_heads, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [L, h, *]
            q = torch.cat([qn, qp], dim=-1).transpose(0, 1)  # [h, n, d]
            k_full = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
            scores = torch.matmul(q, k_full.permute(1, 2, 0)) * self.scale  # [h, n, L]
            mask = torch.arange(slots.numel())[None, :] > positions[:, None]  # [n, L]
            scores = scores.masked_fill(mask[None], float("-inf"))
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            outs.append(torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1))  # [n, h, v]
        return torch.cat(outs, dim=0)

    def _absorbed(self, q_nope, q_pe, batch: AttentionBatch, cache: torch.Tensor) -> torch.Tensor:
        B = len(batch.query_lens)
        lens = torch.tensor([s.numel() for s in batch.context_slots])
        L = int(lens.max())
        slots = torch.zeros(B, L, dtype=torch.long)
        for i, s in enumerate(batch.context_slots):
            slots[i, : s.numel()] = s
        latent = cache[slots].to(q_nope.dtype)  # [B, L, r+p]
        c, k_pe = latent[..., : self.rank], latent[..., self.rank :]
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [h, n, r], [h, v, r]
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)
        scores = torch.einsum("bhr,blr->bhl", q_lat, c) + torch.einsum("bhp,blp->bhl", q_pe, k_pe)
        scores = scores * self.scale
        pad = torch.arange(L)[None, :] >= lens[:, None]  # [B, L]
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
        o_lat = torch.einsum("bhl,blr->bhr", probs, c)
        return torch.einsum("bhr,hvr->bhv", o_lat, w_uv)  # [B, h, v]
