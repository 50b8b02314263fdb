"""The DeepSeek-V2/V3 causal language model, with its routed experts chosen by the caller.

Module names mirror the Hugging Face checkpoint (model.layers.N.self_attn.q_a_proj, ...), so the
loader maps tensors one to one. Routed experts live in an ExpertBank per MoE layer whose keys
the constructor is given: all logical experts (the reference engine), none (an attention
instance that dispatches to expert workers), or a worker's physical slots.

The model owns its math: each DecoderLayer is a sequence of public stages, split as DeepSeek
splits decode attention, and both the plain forward and the overlapped EP runtime
(services/engine/overlap.py) run exactly these, so each piece is defined once:
  attn0          ATTN-0: input norm, MLA projections, rope, latent-KV cache write -> query
  attn1          ATTN-1: core attention, output projection, residual; for a MoE layer also the
                 post-attention norm and the gate -> Attended(h, x, weights, ids)
  dense_ffn      (dense layer) post-attention norm + MLP + residual
  shared_expert  (MoE layer) the shared expert on the normed input x
  combine        (MoE layer) residual + routed + shared, once the routed output is back
The routed experts between gate and combine run wherever the caller says (the local
ExpertBank, or a RoutedFn such as an expert-parallel dispatch). The plain path composes the
stages into two halves: attention_block (attn0 + attn1's attention and residual) and ffn_block
(dense_ffn, or norm + gate + routed experts + shared_expert + combine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from services.model.attention import MLAttention
from services.model.batch import AttentionBatch
from services.model.config import ModelConfig
from services.model.layers import RMSNorm, SwiGLU
from services.model.moe import MoE, RoutedFn
from services.model.rope import RotaryEmbedding

Query = tuple[torch.Tensor, torch.Tensor]  # ATTN-0's output: q_nope [T, h, n], q_pe [T, h, p]

# layer id -> the expert keys this process holds in that layer
ExpertKeys = Mapping[int, Sequence[int]]


def all_experts(cfg: ModelConfig) -> dict[int, tuple[int, ...]]:
    return {layer: tuple(range(cfg.n_routed_experts)) for layer in cfg.moe_layer_ids}


def no_experts(cfg: ModelConfig) -> dict[int, tuple[int, ...]]:
    return {layer: () for layer in cfg.moe_layer_ids}


@dataclass(frozen=True)
class Attended:
    """ATTN-1's result: the hidden state after attention and its residual, and for a MoE layer
    what the routed experts take (else None): the post-attention normed input and the gate's
    choice."""

    h: torch.Tensor  # [T, H]
    x: torch.Tensor | None = None  # [T, H] post-attention norm of h
    weights: torch.Tensor | None = None  # [T, K] fp32 routing weights
    ids: torch.Tensor | None = None  # [T, K] long routed expert ids


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

    # ---- the stages (see the module docstring) ----

    def attn0(self, h: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor,
              rotary: RotaryEmbedding, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> Query:
        return self.self_attn.project(self.input_layernorm(h), batch, cache, rotary, cos_sin)

    def attn1(self, h: torch.Tensor, q: Query, batch: AttentionBatch, cache: torch.Tensor,
              decode_step: bool | None = None) -> Attended:
        """decode_step: whether the whole step is a decode step (None: decide from `batch`);
        a micro-batch of a step passes the step's, see MLAttention.attend."""
        h = self._attention_residual(h, q, batch, cache, decode_step)
        return Attended(h, *self._route(h)) if self.is_moe else Attended(h)

    def dense_ffn(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor | None:
        shared = self.mlp.shared_experts
        return shared(x) if shared is not None else None

    def combine(self, h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """routed: the fp32 routed-expert output; dtype: the MoE input x's dtype."""
        out = routed.to(dtype)
        return h + (out + shared if shared is not None else out)

    # ---- the two halves, composed of the stages ----

    def attention_block(self, h, batch: AttentionBatch, cache, rotary, cos_sin) -> torch.Tensor:
        return self._attention_residual(h, self.attn0(h, batch, cache, rotary, cos_sin), batch,
                                        cache, None)

    def ffn_block(self, h: torch.Tensor, routed_fn: RoutedFn | None = None) -> torch.Tensor:
        if not self.is_moe:
            return self.dense_ffn(h)
        x, weights, ids = self._route(h)
        routed = (routed_fn or self.mlp.experts)(x, ids, weights)
        return self.combine(h, routed, self.shared_expert(x), x.dtype)

    def _attention_residual(self, h, q: Query, batch, cache, decode_step) -> torch.Tensor:
        return h + self.self_attn.attend(*q, batch, cache, decode_step)

    def _route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A MoE layer's post-attention norm and gate: (x, weights, ids)."""
        x = self.post_attention_layernorm(h)
        weights, ids = self.mlp.gate(x)
        return x, weights, ids


def cast_weights(module: nn.Module, dtype: torch.dtype) -> None:
    for name, param in module.named_parameters():
        if ".mlp.gate." not in name:  # the router stays fp32, as DeepSeek runs it
            param.data = param.data.to(dtype)


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
        cast_weights(self, dtype)
        self.mtp = None  # the MTP draft layer, when loaded (services/model/mtp.py attach_mtp)
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

    def logits_and_hidden(self, h: torch.Tensor, rows: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's output h [T, H] -> (fp32 logits of `rows` (default every token),
        final-normed hidden [T, H]): what speculative decoding needs, the MTP draft layer
        taking the hidden state."""
        normed = self.model.norm(h)
        picked = normed if rows is None else normed[rows.to(normed.device)]
        return self.lm_head(picked).float(), normed

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
        return self.forward_with_grad(input_ids, batch, caches, routed_fns, all_logits)

    @torch.inference_mode()
    def forward_tokens(self, input_ids: torch.Tensor, batch: AttentionBatch,
                       caches: Sequence[torch.Tensor], routed_fns: Mapping[int, RoutedFn] | None
                       = None, all_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits of every new token [T, V] (all_logits=False: of each sequence's last,
        [B, V]) and every new token's final-normed hidden state [T, H]: a speculative
        verification step, or a prefill that feeds the MTP draft layer."""
        rows = None if all_logits else batch.last_token_indices()
        return self.logits_and_hidden(self._hidden(input_ids, batch, caches, routed_fns), rows)

    def forward_with_grad(
        self,
        input_ids: torch.Tensor,
        batch: AttentionBatch,
        caches: Sequence[torch.Tensor],
        routed_fns: Mapping[int, RoutedFn] | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """forward's math outside inference mode, so autograd records it: training
        (services/train/) runs whole sequences as one prefill batch over fresh caches through
        this, the same stages serving runs."""
        h = self._hidden(input_ids, batch, caches, routed_fns)
        if not all_logits:
            h = h[batch.last_token_indices().to(h.device)]
        return self.logits(h)

    def _hidden(self, input_ids, batch, caches, routed_fns) -> torch.Tensor:
        """The last decoder layer's output [T, H]."""
        h = self.embed(input_ids)
        cos_sin = self.cos_sin(batch.positions)
        for layer in self.layers:
            h = layer.attention_block(h, batch, caches[layer.layer_id], self.rotary, cos_sin)
            h = layer.ffn_block(h, (routed_fns or {}).get(layer.layer_id))
        return h
