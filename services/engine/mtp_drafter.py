"""The MTP layer as a drafter (services/engine/speculative.py's Drafter).

After each step the MTP layer runs over the positions the step settled: at position i it takes
the accepted token of i+1 and the target's hidden state at i, writes its own latent KV at i
(the cache's draft layer, in the sequence's slots) and proposes the token of i+2 (argmax). Its
attention context starts at the first position it ran for the sequence, the first decode step
on this instance: the prompt's positions have no MTP KV, since prefill does not run the MTP
layer (the hidden state it takes carries the prompt's context). A migrated sequence starts
again on its new instance. The draft never changes the output, only how many tokens a step
yields.
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

    def forget(self, seq_id: str) -> None:
        self._start.pop(seq_id, None)
