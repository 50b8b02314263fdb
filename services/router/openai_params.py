"""The parameters of OpenAI's /v1/completions and /v1/chat/completions bodies, as a
RawRequest (pure, no I/O).

Each parameter is one of three kinds, and none is ever silently ignored:

served       model, prompt (a string, token ids, or a batch of either: n choices of each
             prompt) | messages, max_tokens (max_completion_tokens), temperature, top_p, seed,
             stop (strings), n, presence_penalty, frequency_penalty, logit_bias, logprobs
             (and chat's top_logprobs), stream, stream_options.include_usage, user and
             safety_identifier (logged), and the extensions top_k, ignore_eos and
             stop_token_ids (as vLLM names them);
neutral      accepted only at the value that changes nothing (OpenAI's default, e.g. echo
             false, best_of 1, tools []); any other value is refused;
anything else (tools, an unknown name) is refused.

A refusal is `BadRequest` naming the parameter (`param`, OpenAI's error field). null is every
known parameter's default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from services.router.validation import ChatTurn, RawRequest

DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 16  # n: each choice is a generation of its own (KV, a decode slot)
# prompts x n: the generations one request starts at once, each its own (KV, a decode slot,
# an admission and an API-key slot); the router's default --max-inflight, so that a request
# at the bound can still be admitted whole by a router at its defaults
MAX_GENERATIONS = 64


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OpenAIRequest:
    raw: RawRequest
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    user: str = ""  # user / safety_identifier: only logged
    n: int = 1  # choices: choice i samples with seed + i (greedy choices are all the same)
    # RawRequest field -> the body's parameter, for the `param` of a later refusal
    params: dict[str, str] = field(default_factory=dict)
    # a batch of prompts (completions): one request per prompt, `raw` first; () for one prompt
    batch: tuple[RawRequest, ...] = ()

    @property
    def prompts(self) -> tuple[RawRequest, ...]:
        """One request per prompt, in the body's order (every field but the prompt is raw's)."""
        return self.batch or (self.raw,)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# name -> (what is accepted, the test)
NEUTRAL: dict[bool, dict[str, tuple[str, Callable[[object], bool]]]] = {
    False: {"echo": ("false", lambda x: x is False),
            "best_of": ("1", lambda x: _integer(x) and x == 1),
            "suffix": ('""', lambda x: x == "")},
    True: {"tools": ("[]", lambda x: x == []),
           "tool_choice": ('"none"', lambda x: x == "none"),
           "functions": ("[]", lambda x: x == []),
           "function_call": ('"none"', lambda x: x == "none"),
           "parallel_tool_calls": ("true or false (there are no tools)",
                                   lambda x: isinstance(x, bool)),
           "response_format": ('{"type": "text"}', lambda x: x == {"type": "text"}),
           "modalities": ('["text"]', lambda x: x == ["text"]),
           "store": ("false", lambda x: x is False),
           "metadata": ("{}", lambda x: x == {}),
           "service_tier": ('"auto" or "default"', lambda x: x in ("auto", "default"))},
}
_SERVED_COMMON = ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                  "stream", "stream_options", "user", "safety_identifier", "top_k", "ignore_eos",
                  "stop_token_ids", "stop", "n", "presence_penalty", "frequency_penalty",
                  "logit_bias", "logprobs")
SERVED = {False: (*_SERVED_COMMON, "prompt"),
          True: (*_SERVED_COMMON, "messages", "top_logprobs")}


def parse_body(body: object, chat: bool, request_id: str) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_what_is_not_served(body, chat)
    prompts, messages = (("", ()),), ()
    if chat:
        messages = _messages(body.get("messages"))
    else:
        prompts = _prompts(body.get("prompt"))
    prompt, prompt_ids = prompts[0]
    stream = _typed(body, "stream", bool, False)
    include_usage = _stream_options(body.get("stream_options"), stream)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_integer(t) for t in stop_ids):
        raise BadRequest("stop_token_ids must be a list of integers", "stop_token_ids")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else (
        "max_tokens")
    model = _typed(body, "model", str, "")
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
    if len(prompts) * n > MAX_GENERATIONS:
        raise BadRequest(f"a batch of {len(prompts)} prompts with n = {n} asks for "
                         f"{len(prompts) * n} choices, more than the {MAX_GENERATIONS} one "
                         f"request may (prompts x n)", "prompt")
    raw = RawRequest(
        request_id=request_id, model=model, prompt=prompt, prompt_ids=prompt_ids,
        messages=messages, max_tokens=_typed(body, max_key, int, DEFAULT_MAX_TOKENS),
        temperature=_typed(body, "temperature", float, 1.0),
        top_p=_typed(body, "top_p", float, None), top_k=_typed(body, "top_k", int, 0),
        seed=_typed(body, "seed", int, None), stop_token_ids=tuple(stop_ids),
        ignore_eos=_typed(body, "ignore_eos", bool, False),
        presence_penalty=_typed(body, "presence_penalty", float, 0.0),
        frequency_penalty=_typed(body, "frequency_penalty", float, 0.0),
        logit_bias=_logit_bias(body.get("logit_bias")), logprobs=_logprobs(body, chat),
        stop=_stop(body.get("stop")))
    user = _typed(body, "user", str, "") or _typed(body, "safety_identifier", str, "")
    params = {"prompt": "prompt", "prompt_ids": "prompt", "messages": "messages",
              "max_tokens": max_key, "model": "model", "temperature": "temperature",
              "top_p": "top_p", "top_k": "top_k", "seed": "seed",
              "stop_token_ids": "stop_token_ids", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias",
              "logprobs": "top_logprobs" if chat else "logprobs", "stop": "stop"}
    batch = tuple(dataclasses.replace(raw, prompt=text, prompt_ids=ids)
                  for text, ids in prompts) if len(prompts) > 1 else ()
    return OpenAIRequest(raw, stream, include_usage, user, n=n, params=params, batch=batch)


def _refuse_what_is_not_served(body: dict, chat: bool) -> None:
    neutral = NEUTRAL[chat]
    for key, value in body.items():
        if key in SERVED[chat] or value is None:
            continue
        if key not in neutral:
            endpoint = "chat completions" if chat else "completions"
            raise BadRequest(f"{key!r} is not a parameter of {endpoint} that epserve serves",
                             key)
        accepted, changes_nothing = neutral[key]
        if not changes_nothing(value):
            raise BadRequest(f"{key!r} is not supported by epserve (got {value!r}; only "
                             f"{accepted} is accepted)", key)


def _typed(body: dict, key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
          int: _integer, float: _number}[kind](value)
    if not ok:
        what = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}[kind]
        raise BadRequest(f"{key} must be {what}, got {value!r}", key)
    return kind(value)


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest("stop must be a string or a list of strings", "stop")


def _logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} (JSON keys are strings) as (id, bias) pairs."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise BadRequest("logit_bias must be an object mapping token ids to numbers",
                         "logit_bias")
    out = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or not _number(value):
            raise BadRequest(f"logit_bias maps token ids (strings of digits) to numbers, got "
                             f"{key[:20]!r}: {value!r}", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token (None: no logprobs). Completions: `logprobs` is that
    number; chat: `logprobs` true turns them on and `top_logprobs` is the number."""
    if not chat:
        return _typed(body, "logprobs", int, None)
    top = _typed(body, "top_logprobs", int, None)
    if not _typed(body, "logprobs", bool, False):
        if top is not None:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


_PROMPT_FORMS = ("prompt must be a string, a list of token ids, a list of strings or a list "
                 "of lists of token ids")


def _prompts(p: object) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """OpenAI's four forms of `prompt` as (text, token ids) per prompt. One prompt is as
    before (an empty one is validation's to refuse, as over gRPC); in a batch every prompt
    must be non-empty and all of one form, so that a batch is refused whole, before any of
    its prompts starts."""
    if isinstance(p, str):
        return ((p, ()),)
    if not isinstance(p, list):
        raise BadRequest(f"{_PROMPT_FORMS}, got {json.dumps(p)[:40]}", "prompt")
    if not p:
        raise BadRequest("prompt must not be an empty list", "prompt")
    if all(_integer(t) for t in p):
        return (("", tuple(p)),)
    if all(isinstance(text, str) for text in p):
        if "" in p:
            raise BadRequest(f"prompt[{p.index('')}] is an empty string", "prompt")
        return tuple((text, ()) for text in p)
    if all(isinstance(ids, list) for ids in p):
        for i, ids in enumerate(p):
            if not ids or not all(_integer(t) for t in ids):
                raise BadRequest(f"prompt[{i}] must be a non-empty list of integer token ids",
                                 "prompt")
        return tuple(("", tuple(ids)) for ids in p)
    raise BadRequest(f"{_PROMPT_FORMS}, one form for every prompt of a batch", "prompt")


def _messages(msgs: object) -> tuple[ChatTurn, ...]:
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) and set(m) <= {"role", "content"}
            for m in msgs):
        raise BadRequest("messages must be a list of {role, content} objects with string "
                         "content (no other fields)", "messages")
    return tuple(ChatTurn(m["role"], m["content"]) for m in msgs)


def _stream_options(options: object, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    for key, value in options.items():
        if key == "include_usage" and isinstance(value, bool | None):
            continue
        if key == "include_obfuscation" and (value is False or value is None):
            continue  # epserve's chunks carry no obfuscation field
        raise BadRequest(f"stream_options.{key} = {value!r} is not supported by epserve",
                         "stream_options")
    return bool(options.get("include_usage"))
