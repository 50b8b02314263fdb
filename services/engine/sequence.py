"""One request's generation state: prompt, generated tokens and when it must stop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine.sampling import SamplingParams, TokenLogprobs, choose


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None
    max_context: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # Tokens generated before this sequence started here (a migrated request: they end
    # prompt_ids): the sampling step of the next token counts them too.
    step_offset: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # when params.logprobs is set

    @property
    def next_step(self) -> int:
        """The sampling step of the next token (sampling noise is keyed by it)."""
        return self.step_offset + len(self.output_ids)

    @property
    def generated_ids(self) -> list[int]:
        """Every token generated for the request so far, here and before a migration (the
        presence and frequency penalties count these)."""
        before = self.prompt_ids[len(self.prompt_ids) - self.step_offset:] \
            if self.step_offset else []
        return before + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cache_len(self) -> int:
        """Tokens whose KV is in the cache: every token but the newest generated one."""
        return self.total_len - 1 if self.output_ids else len(self.prompt_ids)

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """The next token from this step's logits [V] (and its logprobs when asked for)."""
        p = self.params
        counted = self.generated_ids if p.presence_penalty or p.frequency_penalty else ()
        return choose(logits, p, self.next_step, counted)

    def append(self, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record a generated token and decide whether the sequence is done."""
        self.output_ids.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        p = self.params
        if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_tokens or self.total_len >= self.max_context:
            self.finish_reason = "length"
