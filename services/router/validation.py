"""Checks a generate request, in plain values, before any instance sees it (pure, no I/O).

Every rule raises `InvalidRequest` with a one-line message meant for the client (the server
maps it to INVALID_ARGUMENT) and the RawRequest field at fault (`param`, None when none is).
The checks run cheapest first: identity and model, the prompt form, the prompt's size (bytes
and ids, before any tokenising: `check_before_encoding`), sampling, then tokenisation and the
lengths and ids that depend on it.
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
    """The request cannot be served as given; the message tells the client why and `param`
    names the RawRequest field at fault (None: the request as a whole)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) in any order
    logprobs: int | None = None  # None: off; n: each token's logprob and n alternatives'
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelLimits:
    name: str  # the served model id
    context_length: int  # prompt + completion tokens
    vocab_size: int  # ids the model can embed and emit
    max_prompt_bytes: int | None = None  # longest prompt text tokenised (None: no limit)


class PromptEncoder(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]: ...


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # a concrete seed whenever temperature > 0
    resume_ids: tuple[int, ...] = ()  # tokens the client already has (see GenerateRequest)
    tenant: str = ""  # who is billed, from the API key ("" without keys)


def validate(raw: RawRequest, limits: ModelLimits, encoder: PromptEncoder) -> ValidRequest:
    sampling = check_before_encoding(raw, limits)
    _check_ids("stop_token_ids", raw.stop_token_ids, limits.vocab_size)
    _check_ids("logit_bias", [t for t, _ in raw.logit_bias], limits.vocab_size)
    prompt_ids = encode_prompt(raw, encoder)
    _check_ids("prompt_ids", prompt_ids, limits.vocab_size)
    check_lengths(len(prompt_ids), sampling.max_tokens, limits.context_length,
                  _prompt_field(raw))
    _check_ids("resume_token_ids", raw.resume_token_ids, limits.vocab_size)
    if len(raw.resume_token_ids) > sampling.max_tokens:
        raise InvalidRequest(f"resume_token_ids holds {len(raw.resume_token_ids)} tokens, "
                             f"more than max_tokens {sampling.max_tokens}", "resume_token_ids")
    return ValidRequest(raw.request_id, prompt_ids, sampling.with_seed(),
                        tuple(raw.resume_token_ids))


def check_before_encoding(raw: RawRequest, limits: ModelLimits) -> SamplingParams:
    """Every check that needs no tokenising (cheap: the server runs it on its event loop, so
    a prompt that cannot be served is refused before any tokenising work is queued)."""
    check_request_id(raw.request_id)
    if raw.model and raw.model != limits.name:
        raise InvalidRequest(f"unknown model {raw.model!r}; this router serves {limits.name!r}",
                             "model")
    _check_one_prompt_form(raw)
    check_prompt_size(raw, limits)
    return sampling_params(raw)


def prompt_bytes(raw: RawRequest) -> int:
    """UTF-8 bytes of the text to tokenise: the prompt, or every chat turn's role and content
    (the template adds bytes of its own, so this never counts more than is tokenised)."""
    return _utf8_len(raw.prompt) + sum(_utf8_len(t.role) + _utf8_len(t.content)
                                       for t in raw.messages)


def check_prompt_size(raw: RawRequest, limits: ModelLimits) -> None:
    if len(raw.prompt_ids) > limits.context_length:
        raise InvalidRequest(f"prompt has {len(raw.prompt_ids)} tokens, more than the model's "
                             f"context of {limits.context_length}", "prompt_ids")
    if limits.max_prompt_bytes is None:
        return
    size = prompt_bytes(raw)
    if size > limits.max_prompt_bytes:
        raise InvalidRequest(
            f"prompt is {size} bytes, more than this router's limit of "
            f"{limits.max_prompt_bytes} (--max-prompt-bytes; the model's context is "
            f"{limits.context_length} tokens)", _prompt_field(raw))


def _prompt_field(raw: RawRequest) -> str:
    return "prompt_ids" if raw.prompt_ids else "messages" if raw.messages else "prompt"


def _utf8_len(text: str) -> int:
    # str.isascii is O(1): most prompts are counted without copying them.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS or not set(request_id) <= (
        _REQUEST_ID_CHARS
    ):
        raise InvalidRequest(
            f"request_id must be 1..{MAX_REQUEST_ID_CHARS} characters of letters, digits and "
            f"-_.:/@+= (got {request_id[:40]!r})", "request_id"
        )


def _check_one_prompt_form(raw: RawRequest) -> None:
    given = [name for name, value in (("prompt", raw.prompt), ("prompt_ids", raw.prompt_ids),
                                      ("messages", raw.messages)) if value]
    if not given:
        raise InvalidRequest("empty prompt: give one of prompt, prompt_ids or messages", "prompt")
    if len(given) > 1:
        raise InvalidRequest(f"give exactly one of prompt, prompt_ids or messages "
                             f"(got {' and '.join(given)})", given[-1])


def sampling_params(raw: RawRequest) -> SamplingParams:
    """The engine's SamplingParams, with its own checks; NaN and infinity are refused too."""
    if raw.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be > 0, got {raw.max_tokens}", "max_tokens")
    for name, value in (("temperature", raw.temperature), ("top_p", raw.top_p),
                        ("presence_penalty", raw.presence_penalty),
                        ("frequency_penalty", raw.frequency_penalty)):
        if value is not None and not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number, got {value}", name)
    ids = [t for t, _ in raw.logit_bias]
    if len(set(ids)) != len(ids):
        raise InvalidRequest("logit_bias names a token id twice", "logit_bias")
    try:
        return SamplingParams(
            max_tokens=raw.max_tokens, temperature=float(raw.temperature),
            top_p=1.0 if raw.top_p is None else float(raw.top_p), top_k=raw.top_k,
            seed=raw.seed, stop_token_ids=tuple(raw.stop_token_ids), ignore_eos=raw.ignore_eos,
            presence_penalty=float(raw.presence_penalty),
            frequency_penalty=float(raw.frequency_penalty),
            logit_bias=tuple(sorted((int(t), float(b)) for t, b in raw.logit_bias)),
            logprobs=raw.logprobs, stop=tuple(raw.stop))
    except ValueError as exc:  # SamplingParams' messages begin with the field's name
        field_name = str(exc).split(" ", 1)[0]
        raise InvalidRequest(str(exc), field_name if field_name in _SAMPLING_FIELDS else None
                             ) from exc


_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids",
                    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "stop")


def encode_prompt(raw: RawRequest, encoder: PromptEncoder) -> tuple[int, ...]:
    if raw.prompt_ids:
        return tuple(raw.prompt_ids)
    if raw.prompt:
        return tuple(encoder.encode(raw.prompt))
    for i, turn in enumerate(raw.messages):
        if turn.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                                 f"got {turn.role!r}", "messages")
    try:
        return tuple(encoder.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in raw.messages]))
    except Exception as exc:  # the template is the checkpoint's code: any failure is the input's
        raise InvalidRequest(f"chat template rejected the messages: {exc}", "messages") from exc


def check_lengths(prompt_tokens: int, max_tokens: int, context_length: int,
                  prompt_field: str = "prompt") -> None:
    if prompt_tokens > context_length:
        raise InvalidRequest(f"prompt has {prompt_tokens} tokens, more than the model's context "
                             f"of {context_length}", prompt_field)
    if prompt_tokens + max_tokens > context_length:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} exceeds the model's context of {context_length}",
            "max_tokens")


def _check_ids(field_name: str, ids: Sequence[int], vocab_size: int) -> None:
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(f"{field_name}[{i}] = {token_id} is outside the vocabulary "
                                 f"[0, {vocab_size})", field_name)
