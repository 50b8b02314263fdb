"""The expert-parallel engine: attention, dense layers, gate and shared expert run here;
routed experts run on expert-worker processes reached through an ExpertClient.

It drives the same GenerationLoop as the reference engine, so the schedule is identical; only
where the routed experts run differs. This is the engine the prefill and decode services use.
"""

from __future__ import annotations

import torch

from services.engine.ep_client import ExpertClient
from services.engine.reference import Completion, EngineStats, GenerationLoop, GenerationRequest
from services.model.batch import AttentionBatch
from services.model.deepseek import DeepseekModel
from services.model.moe import MoE


class EPEngine:
    def __init__(self, model: DeepseekModel, client: ExpertClient, block_size: int = 64,
                 record_logits: bool = False) -> None:
        self.model, self.client = model, client
        self.cfg = model.cfg
        self.block_size, self.record_logits = block_size, record_logits
        self.stats = EngineStats()

    @torch.inference_mode()
    async def forward(self, input_ids: torch.Tensor, batch: AttentionBatch,
                      caches: list[torch.Tensor], micro_batch: int = 0,
                      step_id: int | None = None) -> torch.Tensor:
        """One step over the batch: logits [B, V] of each sequence's last token."""
        model = self.model
        step_id = self.client.new_step() if step_id is None else step_id
        h = model.embed(input_ids.to(model.device))
        cos_sin = model.cos_sin(batch.positions)
        for layer in model.layers:
            h = layer.attention_block(h, batch, caches[layer.layer_id], model.rotary, cos_sin)
            if not layer.is_moe:
                h = layer.ffn_block(h)
                continue
            moe: MoE = layer.mlp
            x = layer.post_attention_layernorm(h)
            weights, ids = moe.gate(x)
            shared = moe.shared(x)
            routed = await self.client.dispatch(step_id, micro_batch, layer.layer_id, x, ids, weights)
            h = h + MoE.combine(routed, shared, x.dtype)
        return model.logits(h[batch.last_token_indices().to(h.device)])

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        loop = GenerationLoop(self.cfg, requests, self.block_size, self.model.dtype,
                              self.model.device, self.record_logits, self.stats)
        while (step := loop.next_step()) is not None:
            loop.consume(step, await self.forward(step.input_ids, step.batch, loop.cache.layers))
        return loop.completions()
