"""Checks a generate request, in plain values, before any instance sees it (pure, no I/O).

Every rule raises `InvalidRequest` with a one-line message meant for the client (the server
maps it to INVALID_ARGUMENT). The checks run cheapest first: identity and model, the prompt
form, sampling, then tokenisation and the lengths and ids that depend on it.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.engine.sampling import SamplingParams

MAX_REQUEST_ID_CHARS = 128
# The id travels in logs, gRPC messages and the Nats-Msg-Id header: no spaces or control chars.
_REQUEST_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_.:/@+=")
CHAT_ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """The request cannot be served as given; the message tells the client why."""


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class RawRequest:
    """A GenerateRequest as plain values; `top_p`/`seed` are None when the client left them unset."""

    request_id: str
    model: str = ""
    prompt: str = ""
    prompt_ids: tuple[int, ...] = ()
    messages: tuple[ChatTurn, ...] = ()
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    resume_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelLimits:
    name: str  # the served model id
    context_length: int  # prompt + completion tokens
    vocab_size: int  # ids the model can embed and emit


class PromptEncoder(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]: ...


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # a concrete seed whenever temperature > 0
    resume_ids: tuple[int, ...] = ()  # tokens the client already has (see GenerateRequest)


def validate(raw: RawRequest, limits: ModelLimits, encoder: PromptEncoder) -> ValidRequest:
    check_request_id(raw.request_id)
    if raw.model and raw.model != limits.name:
        raise InvalidRequest(f"unknown model {raw.model!r}; this router serves {limits.name!r}")
    _check_one_prompt_form(raw)
    sampling = sampling_params(raw)
    _check_ids("stop_token_ids", raw.stop_token_ids, limits.vocab_size)
    prompt_ids = encode_prompt(raw, encoder)
    _check_ids("prompt_ids", prompt_ids, limits.vocab_size)
    check_lengths(len(prompt_ids), sampling.max_tokens, limits.context_length)
    _check_ids("resume_token_ids", raw.resume_token_ids, limits.vocab_size)
    if len(raw.resume_token_ids) > sampling.max_tokens:
        raise InvalidRequest(f"resume_token_ids holds {len(raw.resume_token_ids)} tokens, "
                             f"more than max_tokens {sampling.max_tokens}")
    return ValidRequest(raw.request_id, prompt_ids, sampling.with_seed(),
                        tuple(raw.resume_token_ids))


def check_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS or not set(request_id) <= (
        _REQUEST_ID_CHARS
    ):
        raise InvalidRequest(
            f"request_id must be 1..{MAX_REQUEST_ID_CHARS} characters of letters, digits and "
            f"-_.:/@+= (got {request_id[:40]!r})"
        )


def _check_one_prompt_form(raw: RawRequest) -> None:
    given = [name for name, value in (("prompt", raw.prompt), ("prompt_ids", raw.prompt_ids),
                                      ("messages", raw.messages)) if value]
    if not given:
        raise InvalidRequest("empty prompt: give one of prompt, prompt_ids or messages")
    if len(given) > 1:
        raise InvalidRequest(f"give exactly one of prompt, prompt_ids or messages "
                             f"(got {' and '.join(given)})")


def sampling_params(raw: RawRequest) -> SamplingParams:
    """The engine's SamplingParams, with its own checks; NaN and infinity are refused too."""
    if raw.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be > 0, got {raw.max_tokens}")
    for name, value in (("temperature", raw.temperature), ("top_p", raw.top_p)):
        if value is not None and not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number, got {value}")
    try:
        return SamplingParams(
            max_tokens=raw.max_tokens, temperature=float(raw.temperature),
            top_p=1.0 if raw.top_p is None else float(raw.top_p), top_k=raw.top_k,
            seed=raw.seed, stop_token_ids=tuple(raw.stop_token_ids), ignore_eos=raw.ignore_eos)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc


def encode_prompt(raw: RawRequest, encoder: PromptEncoder) -> tuple[int, ...]:
    if raw.prompt_ids:
        return tuple(raw.prompt_ids)
    if raw.prompt:
        return tuple(encoder.encode(raw.prompt))
    for i, turn in enumerate(raw.messages):
        if turn.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                                 f"got {turn.role!r}")
    try:
        return tuple(encoder.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in raw.messages]))
    except Exception as exc:  # the template is the checkpoint's code: any failure is the input's
        raise InvalidRequest(f"chat template rejected the messages: {exc}") from exc


def check_lengths(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    if prompt_tokens > context_length:
        raise InvalidRequest(f"prompt has {prompt_tokens} tokens, more than the model's context "
                             f"of {context_length}")
    if prompt_tokens + max_tokens > context_length:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} exceeds the model's context of {context_length}")


def _check_ids(field_name: str, ids: Sequence[int], vocab_size: int) -> None:
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(f"{field_name}[{i}] = {token_id} is outside the vocabulary "
                                 f"[0, {vocab_size})")
