"""The single-process reference engine: the definition of "the right answer".

Batched prefill of every prompt, then batched decode steps over the paged latent cache until
every sequence stops. It holds all routed experts locally; an optional `routed_fns` swaps the
local experts of a layer for another implementation (the expert-parallel runtime reuses this
loop through EPEngine). Per-step logits can be recorded for near-tie analysis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.sampling import SamplingParams, sample_token
from services.engine.sequence import Sequence
from services.model.deepseek import DeepseekModel


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    logits: list[torch.Tensor] = field(default_factory=list)  # the logits each token came from


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class ReferenceEngine:
    def __init__(self, model: DeepseekModel, block_size: int = 64, record_logits: bool = False):
        self.model = model
        self.cfg = model.cfg
        self.block_size = block_size
        self.record_logits = record_logits
        self.stats = EngineStats()

    def forward(self, input_ids: torch.Tensor, batch, cache: LatentKVCache) -> torch.Tensor:
        """One model step; EP subclasses override this to dispatch routed experts remotely."""
        return self.model(input_ids.to(self.model.device), batch, cache.layers)

    def validate(self, req: GenerationRequest) -> None:
        if not req.prompt_ids:
            raise ValueError(f"{req.request_id}: empty prompt")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"{req.request_id}: token id {bad[0]} outside vocab [0, {self.cfg.vocab_size})")
        if len(req.prompt_ids) >= self.cfg.max_position_embeddings:
            raise ValueError(f"{req.request_id}: prompt of {len(req.prompt_ids)} tokens leaves no "
                             f"room in a context of {self.cfg.max_position_embeddings}")

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        for r in requests:
            self.validate(r)
        seqs = [
            Sequence(r.request_id, list(r.prompt_ids), r.params.with_seed(), self.cfg.eos_token_id,
                     self.cfg.max_position_embeddings)
            for r in requests
        ]
        logits_log: dict[str, list[torch.Tensor]] = {s.request_id: [] for s in seqs}
        blocks = sum(-(-min(len(s.prompt_ids) + s.params.max_tokens, s.max_context)
                     // self.block_size) for s in seqs)
        cache = LatentKVCache(self.cfg.num_hidden_layers, self.cfg.latent_dim, blocks,
                              self.block_size, self.model.dtype, self.model.device)
        # Prefill: every prompt in one ragged batch.
        t0 = time.perf_counter()
        batch = cache.batch([SeqChunk(s.request_id, 0, len(s.prompt_ids)) for s in seqs])
        ids = torch.tensor([t for s in seqs for t in s.prompt_ids], dtype=torch.long)
        logits = self.forward(ids, batch, cache)
        self._sample(seqs, logits, logits_log)
        self.stats.prefill_tokens += ids.numel()
        self.stats.prefill_seconds += time.perf_counter() - t0
        # Decode: running sequences each add their newest token.
        t0 = time.perf_counter()
        while running := [s for s in seqs if not s.finished]:
            batch = cache.batch([SeqChunk(s.request_id, s.cache_len, 1) for s in running])
            ids = torch.tensor([s.output_ids[-1] for s in running], dtype=torch.long)
            logits = self.forward(ids, batch, cache)
            self._sample(running, logits, logits_log)
            self.stats.decode_tokens += len(running)
            self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        return [
            Completion(s.request_id, s.prompt_ids, s.output_ids, s.finish_reason or "length",
                       logits_log[s.request_id])
            for s in seqs
        ]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                log: dict[str, list[torch.Tensor]]) -> None:
        logits = logits.float().cpu()
        for s, row in zip(seqs, logits, strict=True):
            if self.record_logits:
                log[s.request_id].append(row.clone())
            s.append(sample_token(row, s.params, step=len(s.output_ids)))
