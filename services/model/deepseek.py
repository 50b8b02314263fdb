"""The DeepSeek-V2/V3 causal language model, with its routed experts chosen by the caller.

Module names mirror the Hugging Face checkpoint (model.layers.N.self_attn.q_a_proj, ...), so the
loader maps tensors one to one. Routed experts live in an ExpertBank per MoE layer whose keys
the constructor is given: all logical experts (the reference engine), none (an attention
instance that dispatches to expert workers), or a worker's physical slots.
Each layer exposes its two halves so an expert-parallel runtime can drive the loop itself:
attention_block (norm + MLA + residual) and ffn_block (norm + dense MLP or MoE + residual).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from services.model.attention import MLAttention
from services.model.batch import AttentionBatch
from services.model.config import ModelConfig
from services.model.layers import RMSNorm, SwiGLU
from services.model.moe import MoE, RoutedFn
from services.model.rope import RotaryEmbedding

# layer id -> the expert keys this process holds in that layer
ExpertKeys = Mapping[int, Sequence[int]]


def all_experts(cfg: ModelConfig) -> dict[int, tuple[int, ...]]:
    return {layer: tuple(range(cfg.n_routed_experts)) for layer in cfg.moe_layer_ids}


def no_experts(cfg: ModelConfig) -> dict[int, tuple[int, ...]]:
    return {layer: () for layer in cfg.moe_layer_ids}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, expert_keys: Sequence[int],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        if self.is_moe:
            self.mlp: nn.Module = MoE(cfg, expert_keys, dtype)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def attention_block(self, h, batch: AttentionBatch, cache, rotary, cos_sin) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), batch, cache, rotary, cos_sin)

    def ffn_block(self, h: torch.Tensor, routed_fn: RoutedFn | None = None) -> torch.Tensor:
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, routed_fn) if self.is_moe else self.mlp(x))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: ExpertKeys | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        experts = all_experts(cfg) if experts is None else experts
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(
            DecoderLayer(cfg, i, experts.get(i, ()), dtype) for i in range(cfg.num_hidden_layers)
        )
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for name, param in self.named_parameters():
            if ".mlp.gate." not in name:  # the router stays fp32, as DeepSeek runs it
                param.data = param.data.to(dtype)
        with torch.device("cpu"):
            self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.rope_interleave)

    @property
    def layers(self) -> Sequence[DecoderLayer]:
        return self.model.layers  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary.cos_sin(positions.cpu())
        return cos.to(self.device), sin.to(self.device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h)).float()

    def expert_banks(self) -> dict[int, nn.Module]:
        return {layer.layer_id: layer.mlp.experts for layer in self.layers if layer.is_moe}

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        batch: AttentionBatch,
        caches: Sequence[torch.Tensor],
        routed_fns: Mapping[int, RoutedFn] | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """input_ids [T] -> fp32 logits [B, V] of each sequence's last token ([T, V] if all_logits).

        routed_fns maps a MoE layer id to a replacement for its local ExpertBank (EP dispatch).
        """
        h = self.embed(input_ids)
        cos_sin = self.cos_sin(batch.positions)
        for layer in self.layers:
            h = layer.attention_block(h, batch, caches[layer.layer_id], self.rotary, cos_sin)
            h = layer.ffn_block(h, (routed_fns or {}).get(layer.layer_id))
        if not all_logits:
            h = h[batch.last_token_indices().to(h.device)]
        return self.logits(h)
