"""DeepSeek-V3's multi-token-prediction (MTP) module, used as the speculative draft.

A V3 checkpoint with `num_nextn_predict_layers: 1` has one more layer after the last decoder
layer (layer 61 of 0..60): a full decoder layer (MLA + MoE) behind a small input stage, and its
own copies of the embedding and the output head. At position i it combines the main model's
final hidden state h_i with the embedding of the token at i+1 and predicts the token at i+2:

    x_i = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])      (embedding first, as vLLM and
    y_i = decoder_layer(x_i)  (attending over its own latent   SGLang load V3's weights)
          KV cache of earlier positions)
    logits_i = shared_head.head(shared_head.norm(y_i))

h_i is the main model's hidden state after its final norm (what vLLM and SGLang hand the MTP
layer). Module names follow the checkpoint under `model.layers.{N}.` so the loader maps them
one to one; a checkpoint without the embedding or head copies shares the main model's.
The layer's routed experts are held here (all of them): the draft runs where decode runs.
"""

from __future__ import annotations

import torch
from torch import nn

from services.model.batch import AttentionBatch
from services.model.config import ModelConfig
from services.model.deepseek import DecoderLayer, cast_weights
from services.model.layers import RMSNorm
from services.model.rope import RotaryEmbedding


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """One MTP depth: the input stage (enorm, hnorm, eh_proj), the decoder layer it inherits,
    and the output stage (shared_head)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        layer_id = cfg.num_hidden_layers
        super().__init__(cfg, layer_id, tuple(range(cfg.n_routed_experts))
                         if cfg.is_moe_layer(layer_id) else (), dtype)
        H = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head = SharedHead(cfg)

    def draft_logits(self, tokens: torch.Tensor, hidden: torch.Tensor, batch: AttentionBatch,
                     cache: torch.Tensor, rotary: RotaryEmbedding,
                     cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """tokens [T] (the token after each position), hidden [T, H] (the main model's normed
        hidden state at each position) -> fp32 logits [T, V] for the position after next.
        Writes this layer's latent KV of the T positions into `cache`."""
        e = self.enorm(self.embed_tokens(tokens))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden.to(e.dtype))], dim=-1))
        x = self.attention_block(x, batch, cache, rotary, cos_sin)
        x = self.ffn_block(x)
        return self.shared_head.head(self.shared_head.norm(x)).float()


def mtp_checkpoint_key(cfg: ModelConfig, state_key: str) -> str:
    """The checkpoint name of an MTPLayer parameter (`mtp.` + name in DeepseekModel)."""
    return f"model.layers.{cfg.num_hidden_layers}." + state_key.removeprefix("mtp.")


# What a checkpoint may leave out of the MTP layer, and what stands in for it: V3 ships copies
# of the embedding and head in layer 61; other exporters share the main model's.
MTP_SHARED_FALLBACK = {"mtp.embed_tokens.weight": "model.embed_tokens.weight",
                       "mtp.shared_head.head.weight": "lm_head.weight"}


def attach_mtp(model) -> MTPLayer:
    """Give a DeepseekModel (built on any device, meta included) its MTP layer as `model.mtp`,
    cast as the model's weights are."""
    layer = MTPLayer(model.cfg, model.dtype)
    cast_weights(layer, model.dtype)
    model.mtp = layer
    return layer
