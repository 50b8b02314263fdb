"""One request's generation state: prompt, generated tokens and when it must stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.sampling import SamplingParams


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

    @property
    def next_step(self) -> int:
        """The sampling step of the next token (sampling noise is keyed by it)."""
        return self.step_offset + len(self.output_ids)

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

    def append(self, token: int) -> None:
        """Record a generated token and decide whether the sequence is done."""
        self.output_ids.append(token)
        p = self.params
        if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_tokens or self.total_len >= self.max_context:
            self.finish_reason = "length"
