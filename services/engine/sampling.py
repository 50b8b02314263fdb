"""Sampling parameters and the sampler.

Random draws are a pure function of (seed, step): step k of a request uses noise seeded by
hash(seed, k), not a generator's running state. Any process that holds the same logits at
step k draws the same token, so a request re-driven on another instance mid-stream, or split
across prefill and decode instances, samples exactly as the reference engine does.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2^63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed (random if none was given), fixed for the request's life."""
        if self.seed is not None or self.greedy:
            return self
        return SamplingParams(**{**self.__dict__, "seed": secrets.randbits(62)})


def _step_noise(seed: int, step: int, vocab: int) -> torch.Tensor:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.empty(vocab).exponential_(generator=g)  # Exp(1) draws


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k then top-p on one row of fp32 logits [V]; removed entries -> -inf."""
    x = logits.float() / p.temperature
    if p.top_k and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        cumulative = probs.cumsum(-1)
        drop = cumulative - probs > p.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample_token(logits: torch.Tensor, p: SamplingParams, step: int) -> int:
    """logits [V] fp32 -> token id. Greedy ties break to the lowest id (torch.argmax)."""
    if p.greedy:
        return int(torch.argmax(logits))
    if p.seed is None:
        raise ValueError("sampling needs a seed: call params.with_seed() when admitting")
    probs = torch.softmax(filter_logits(logits, p), dim=-1)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p.
    return int(torch.argmax(probs / _step_noise(p.seed, step, probs.numel())))
