"""Speculative decoding: one drafted token per sequence, verified in the next decode step.

A step feeds each sequence its newest token and, when it has one, the draft for the position
after it (two new tokens, attended as decode queries: AttentionBatch.speculative). The target
token at each position is then sampled exactly as plain decoding samples it, from that
position's logits with the sampling step's own noise (services/engine/sampling.py), and the
draft is accepted when it equals the sampled token, in which case the next position's token is
sampled too. So the output is the one plain decoding gives, token for token, greedy or seeded:
the draft only decides how many tokens a step yields (1 or 2), never which. (Rejection
sampling keeps only the distribution, and would make seeded output depend on the draft.)

After verification the drafter sees what was accepted and proposes the next drafts; a
sequence too close to its end (max_tokens, context) gets no draft, so a step never writes KV
past the sequence's reservation. A rejected draft's KV is rewritten by the next step, which
feeds the accepted token at that position.

DraftStats counts proposals and acceptances per draft position (1: the only one with MTP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from services.engine.kv_cache import SeqChunk
from services.engine.sequence import Sequence


@dataclass(frozen=True)
class DraftInput:
    """What a step settled for one sequence, for the drafter: the tokens it accepted (the
    target tokens of positions first+1 ...) and the target model's final-normed hidden state
    at positions first ... (the inputs that produced them)."""

    seq: Sequence
    first: int  # position of the first hidden row
    tokens: list[int]
    hidden: torch.Tensor  # [len(tokens), H]


class Drafter(Protocol):
    def propose(self, inputs: list[DraftInput]) -> list[int]:
        """The drafted token for the position after each sequence's newest token."""

    def forget(self, seq_id: str) -> None:
        """The sequence is gone (finished, cancelled, migrated away)."""


@dataclass
class DraftStats:
    proposed: list[int] = field(default_factory=lambda: [0])  # per draft position
    accepted: list[int] = field(default_factory=lambda: [0])
    seq_steps: int = 0  # (sequence, step) pairs verified
    tokens: int = 0  # tokens they yielded

    def acceptance(self, position: int = 1) -> float:
        p = self.proposed[position - 1]
        return self.accepted[position - 1] / p if p else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sequence gains per decode step (1 without speculation)."""
        return self.tokens / self.seq_steps if self.seq_steps else 0.0


@dataclass(frozen=True)
class VerifyPlan:
    """One speculative decode step: the tokens to feed and where they go."""

    seqs: list[Sequence]
    input_ids: torch.Tensor  # [T]
    chunks: list[SeqChunk]
    drafts: list[int | None]  # the draft fed for each sequence (None: its newest token only)


def has_room_for_draft(seq: Sequence) -> bool:
    """Two more tokens fit the sequence's max_tokens and context (so the draft's KV slot is
    inside its reservation)."""
    return (len(seq.output_ids) + 2 <= seq.params.max_tokens
            and seq.total_len + 2 <= seq.max_context)


class Speculation:
    """The step schedule of speculative decoding over some drafter (MTP, or a test's)."""

    def __init__(self, drafter: Drafter, stats: DraftStats | None = None) -> None:
        self.drafter = drafter
        self.stats = stats if stats is not None else DraftStats()
        self._drafts: dict[str, int] = {}

    def plan(self, seqs: list[Sequence]) -> VerifyPlan:
        ids, chunks, drafts = [], [], []
        for s in seqs:
            draft = self._drafts.pop(s.request_id, None)
            if draft is not None and not has_room_for_draft(s):
                draft = None
            fed = [s.output_ids[-1]] + ([draft] if draft is not None else [])
            ids.extend(fed)
            chunks.append(SeqChunk(s.request_id, s.cache_len, len(fed)))
            drafts.append(draft)
        return VerifyPlan(seqs, torch.tensor(ids, dtype=torch.long), chunks, drafts)

    def settle(self, plan: VerifyPlan, logits: torch.Tensor, hidden: torch.Tensor,
               append: Callable[[Sequence, int, object, torch.Tensor], bool]
               ) -> list[DraftInput]:
        """Sample and accept each sequence's tokens from the step's logits [T, V] (append(seq,
        token, logprobs, logits row) records one and may finish the sequence; it returns False
        when the sequence is gone, cancelled meanwhile); returns what the drafter needs for
        the sequences still running."""
        out, row = [], 0
        for s, draft in zip(plan.seqs, plan.drafts, strict=True):
            n = 1 if draft is None else 2
            first, tokens, gone = s.cache_len, [], False
            for j in range(n):
                if s.finished:
                    break
                token, logprobs = s.sample(logits[row + j])
                if not append(s, token, logprobs, logits[row + j]):
                    gone = True
                    break
                tokens.append(token)
                if j == 0 and draft is not None:
                    self.stats.proposed[0] += 1
                    if token != draft:
                        break
                    self.stats.accepted[0] += 1
            self.stats.tokens += len(tokens)
            self.stats.seq_steps += 1 if tokens else 0
            if gone or s.finished or not tokens:
                self.forget(s.request_id)
            else:
                out.append(DraftInput(s, first, tokens, hidden[row: row + len(tokens)]))
            row += n
        return out

    def draft(self, inputs: list[DraftInput]) -> None:
        """Ask the drafter for the next drafts (torch work: the caller's compute thread)."""
        if inputs:
            for i, token in zip(inputs, self.drafter.propose(inputs), strict=True):
                self._drafts[i.seq.request_id] = token

    def adopt(self, seq_id: str, start: int, draft: int) -> None:
        """A sequence arrives with its draft layer's KV from `start` on (a prefill ran the
        drafter over its prompt) and the draft for its first decode step."""
        self._drafts[seq_id] = draft
        adopt = getattr(self.drafter, "adopt", None)
        if adopt is not None:
            adopt(seq_id, start)

    def forget(self, seq_id: str) -> None:
        self._drafts.pop(seq_id, None)
        self.drafter.forget(seq_id)
