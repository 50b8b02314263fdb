"""The MTP layer as a drafter (services/engine/speculative.py's Drafter).

The MTP layer runs over the positions each step settled: at position i it takes the token of
i+1 and the target's hidden state at i, writes its own latent KV at i (the cache's draft
layer, in the sequence's slots) and proposes the token of i+2 (argmax). A prefill runs it over
the prompt (each position followed by the next prompt token, the last by token 0), so its
attention context starts at the first position it ran for the sequence: 0, or after a prefix
cache hit the first position prefill computed (a cached page holds no MTP KV), or, when the
prefill did not run it, the first decode step on this instance. The draft never changes the
output, only how many tokens a step yields.
"""

from __future__ import annotations

import torch

from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.speculative import DraftInput


class MTPDrafter:
    def __init__(self, model, cache: LatentKVCache) -> None:
        if model.mtp is None:
            raise ValueError("the model has no MTP layer: load it with mtp=True")
        if not cache.draft_layers:
            raise ValueError("the KV cache has no draft layer for the MTP layer")
        self.model, self.cache = model, cache
        self._start: dict[str, int] = {}  # sequence -> first position with MTP KV

    @torch.inference_mode()
    def propose(self, inputs: list[DraftInput]) -> list[int]:
        chunks = [SeqChunk(i.seq.request_id, i.first, len(i.tokens),
                           context_from=self._start.setdefault(i.seq.request_id, i.first))
                  for i in inputs]
        batch = self.cache.batch(chunks, speculative=True)
        model, device = self.model, self.model.device
        tokens = torch.tensor([t for i in inputs for t in i.tokens], dtype=torch.long,
                              device=device)
        hidden = torch.cat([i.hidden for i in inputs]).to(device)
        logits = model.mtp.draft_logits(tokens, hidden, batch, self.cache.draft_layers[0],
                                        model.rotary, model.cos_sin(batch.positions))
        return logits[batch.last_token_indices().to(device)].argmax(dim=-1).tolist()

    def adopt(self, seq_id: str, start: int) -> None:
        """The sequence's draft-layer KV from `start` on is in the cache (sent by prefill)."""
        self._start[seq_id] = start

    def forget(self, seq_id: str) -> None:
        self._start.pop(seq_id, None)
