"""Where each new token of a batch sits in the latent KV cache.

A batch is ragged: T new tokens from several sequences laid end to end. The cache is a flat
array of slots per layer; a paged allocator (services/engine/kv_cache.py) decides which slot
holds which position. Shapes: T = new tokens in the batch, L = context length of a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class AttentionBatch:
    positions: torch.Tensor  # [T] long: absolute position of each new token
    query_lens: tuple[int, ...]  # new tokens per sequence, summing to T
    context_slots: tuple[torch.Tensor, ...]  # per sequence [L] long: slot of positions 0..L-1
    write_slots: torch.Tensor  # [T] long: slot that receives each new token's latent KV
    # A decode step whose sequences may carry drafted tokens (speculative decoding): every
    # new token is attended as a decode query over the context up to itself.
    speculative: bool = False

    def __post_init__(self) -> None:
        if sum(self.query_lens) != self.positions.numel():
            raise ValueError("query_lens must sum to the number of new tokens")
        if len(self.context_slots) != len(self.query_lens):
            raise ValueError("one context_slots entry per sequence")
        if self.write_slots.numel() != self.positions.numel():
            raise ValueError("one write slot per new token")

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    @property
    def is_decode(self) -> bool:
        """A decode step (the absorbed-attention path): every sequence adds exactly one token,
        or the step is speculative."""
        return self.speculative or all(n == 1 for n in self.query_lens)

    @cached_property
    def padded_context(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every sequence's context slots padded to the longest: slots [B, L] (padding reads
        slot 0) and the padding mask [B, L] (True = padding), None when nothing is padded.
        Computed once per batch, however many layers attend over it."""
        lens = [s.numel() for s in self.context_slots]
        if min(lens) == max(lens):
            return torch.stack(self.context_slots), None
        slots = torch.nn.utils.rnn.pad_sequence(list(self.context_slots), batch_first=True)
        pad = torch.arange(slots.shape[1])[None, :] >= torch.tensor(lens)[:, None]
        return slots, pad

    @cached_property
    def token_context(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """padded_context per new token: token j of a sequence with n new tokens and context
        slots S sees S[:len(S) - n + j + 1], itself and what precedes it (causality without a
        position mask; a context need not start at position 0, see SeqChunk.context_from)."""
        if all(n == 1 for n in self.query_lens):
            return self.padded_context
        rows = [s[: s.numel() - n + j + 1] for s, n in zip(self.context_slots, self.query_lens,
                                                           strict=True) for j in range(n)]
        lens = [r.numel() for r in rows]
        slots = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        if min(lens) == max(lens):
            return slots, None
        return slots, torch.arange(slots.shape[1])[None, :] >= torch.tensor(lens)[:, None]

    def last_token_indices(self) -> torch.Tensor:
        """[B] index of each sequence's last new token within the batch."""
        ends = torch.tensor(self.query_lens, dtype=torch.long).cumsum(0)
        return ends - 1

    def split(self, seq_ranges: list[range]) -> list[AttentionBatch]:
        """Sub-batches made of consecutive sequences (for micro-batching)."""
        offsets = [0]
        for n in self.query_lens:
            offsets.append(offsets[-1] + n)
        parts = []
        for r in seq_ranges:
            lo, hi = offsets[r.start], offsets[r.stop]
            parts.append(
                AttentionBatch(
                    positions=self.positions[lo:hi],
                    query_lens=self.query_lens[r.start : r.stop],
                    context_slots=self.context_slots[r.start : r.stop],
                    write_slots=self.write_slots[lo:hi],
                    speculative=self.speculative,
                )
            )
        return parts


def contiguous_batch(seq_lens_before: list[int], query_lens: list[int], stride: int) -> AttentionBatch:
    """A batch over a simple contiguous cache: sequence i owns slots [i*stride, (i+1)*stride)."""
    positions, write, ctx = [], [], []
    for i, (past, n) in enumerate(zip(seq_lens_before, query_lens, strict=True)):
        if past + n > stride:
            raise ValueError("sequence longer than its cache stride")
        base = i * stride
        positions.append(torch.arange(past, past + n))
        write.append(base + torch.arange(past, past + n))
        ctx.append(base + torch.arange(0, past + n))
    return AttentionBatch(
        positions=torch.cat(positions),
        query_lens=tuple(query_lens),
        context_slots=tuple(ctx),
        write_slots=torch.cat(write),
    )
