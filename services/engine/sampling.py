"""Sampling parameters and the sampler.

Random draws are a pure function of (seed, step): step k of a request uses noise seeded by
hash(seed, k), not a generator's running state. Any process that holds the same logits at
step k draws the same token, so a request re-driven on another instance mid-stream, or split
across prefill and decode instances, samples exactly as the reference engine does.

What a token is drawn from, in order: the model's logits, plus `logit_bias`, minus the
presence and frequency penalties over the tokens generated so far (OpenAI's definitions; a
migrated request counts the tokens streamed before it too); then greedy argmax, or
temperature, top-k, top-p and the seeded draw. Log-probabilities, when asked for, are those of
the model's own distribution (log-softmax of the raw logits, before any of these), as vLLM
reports them by default.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
PENALTY_RANGE = 2.0  # presence / frequency penalties lie in [-2, 2] (OpenAI)
BIAS_RANGE = 100.0  # logit_bias values lie in [-100, 100] (OpenAI)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    logprobs: int | None = None  # None: off; n: the chosen token's and n alternatives'
    stop: tuple[str, ...] = ()  # stop strings: matched on the text (the router and engine)

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2^63)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -PENALTY_RANGE <= value <= PENALTY_RANGE):
                raise ValueError(f"{name} must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}], "
                                 f"got {value}")
        ids = [t for t, _ in self.logit_bias]
        if ids != sorted(set(ids)):
            raise ValueError("logit_bias must name each token id once, in increasing order")
        for token, bias in self.logit_bias:
            if token < 0 or not (math.isfinite(bias) and -BIAS_RANGE <= bias <= BIAS_RANGE):
                raise ValueError(f"logit_bias of token {token} must be in [-{BIAS_RANGE:g}, "
                                 f"{BIAS_RANGE:g}] for a token id >= 0, got {bias}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(self.stop)} strings, more than {MAX_STOP_STRINGS}")
        for s in self.stop:
            if not 0 < len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be 1..{MAX_STOP_CHARS} characters, "
                                 f"got {len(s)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed (random if none was given), fixed for the request's life."""
        if self.seed is not None or self.greedy:
            return self
        return SamplingParams(**{**self.__dict__, "seed": secrets.randbits(62)})


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the `top` most likely tokens' (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _step_noise(seed: int, step: int, vocab: int) -> torch.Tensor:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.empty(vocab).exponential_(generator=g)  # Exp(1) draws


def adjust_logits(logits: torch.Tensor, p: SamplingParams,
                  generated: Sequence[int] = ()) -> torch.Tensor:
    """logit_bias and the presence / frequency penalties on one row of logits [V]."""
    if not p.adjusts_logits:
        return logits
    x = logits.float().clone()
    vocab = x.numel()
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias if t < vocab], dtype=torch.long)
        bias = torch.tensor([b for t, b in p.logit_bias if t < vocab], dtype=torch.float32)
        x.index_add_(0, ids, bias)
    if generated and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(generated), dtype=torch.long),
                                minlength=vocab)[:vocab].float()
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return x


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


def sample_token(logits: torch.Tensor, p: SamplingParams, step: int,
                 generated: Sequence[int] = ()) -> int:
    """logits [V] fp32 -> token id. Greedy ties break to the lowest id (torch.argmax).
    `generated`: the tokens generated before this one (the penalties count them)."""
    x = adjust_logits(logits, p, generated)
    if p.greedy:
        return int(torch.argmax(x))
    if p.seed is None:
        raise ValueError("sampling needs a seed: call params.with_seed() when admitting")
    probs = torch.softmax(filter_logits(x, p), dim=-1)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p.
    return int(torch.argmax(probs / _step_noise(p.seed, step, probs.numel())))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """The model's log-probability of `token` and of its `top` most likely tokens (ties to the
    lowest id, as the sampler's argmax)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.sort(lp, descending=True, stable=True)
        values, ids = values[:top], ids[:top]
        best = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
    return TokenLogprobs(token, float(lp[token]), best)


def choose(logits: torch.Tensor, p: SamplingParams, step: int,
           generated: Sequence[int] = ()) -> tuple[int, TokenLogprobs | None]:
    """The token of one step, and its log-probabilities when the request asked for them."""
    token = sample_token(logits, p, step, generated)
    if p.logprobs is None:
        return token, None
    return token, token_logprobs(logits, token, p.logprobs)
