"""Router request validation: every rule, with the message fragments clients see."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.router.validation import (
    MAX_REQUEST_ID_CHARS,
    ChatTurn,
    InvalidRequest,
    ModelLimits,
    RawRequest,
    ValidRequest,
    check_before_encoding,
    prompt_bytes,
    validate,
)

LIMITS = ModelLimits(name="tiny", context_length=32, vocab_size=100)


class FakeEncoder:
    """One token per character (ord % 90 + 10), BOS = 1; chat turns as '<role>content'."""

    def __init__(self, template_error: Exception | None = None) -> None:
        self.template_error = template_error
        self.calls: list[tuple[str, Any]] = []

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        self.calls.append(("encode", text))
        return ([1] if add_bos else []) + [ord(c) % 90 + 10 for c in text]

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        self.calls.append(("chat", messages))
        if self.template_error is not None:
            raise self.template_error
        ids = [1]
        for m in messages:
            ids.append({"system": 2, "user": 3, "assistant": 4}[m["role"]])
            ids.extend(self.encode(m["content"], add_bos=False))
        return ids


def raw(**kw: Any) -> RawRequest:
    kw.setdefault("request_id", "req-1")
    kw.setdefault("max_tokens", 4)
    if not any(k in kw for k in ("prompt", "prompt_ids", "messages")):
        kw["prompt_ids"] = (5, 6, 7)
    return RawRequest(**kw)


def invalid(r: RawRequest, encoder: FakeEncoder | None = None,
            limits: ModelLimits = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as exc_info:
        validate(r, limits, encoder or FakeEncoder())
    return str(exc_info.value)


# -- the happy paths ---------------------------------------------------------------------------

def test_prompt_ids_pass_through_unchanged_and_encoder_unused():
    enc = FakeEncoder()
    out = validate(raw(prompt_ids=(5, 6, 7), max_tokens=3), LIMITS, enc)
    assert isinstance(out, ValidRequest)
    assert out.request_id == "req-1"
    assert out.prompt_ids == (5, 6, 7)
    assert out.sampling.max_tokens == 3
    assert out.sampling.greedy and out.sampling.seed is None  # greedy needs no seed
    assert enc.calls == []


def test_text_prompt_is_encoded_with_bos():
    out = validate(raw(prompt="ab"), LIMITS, FakeEncoder())
    assert out.prompt_ids == (1, ord("a") % 90 + 10, ord("b") % 90 + 10)


def test_messages_go_through_the_chat_template():
    enc = FakeEncoder()
    msgs = (ChatTurn("system", "s"), ChatTurn("user", "u"), ChatTurn("assistant", "a"))
    out = validate(raw(messages=msgs), LIMITS, enc)
    assert enc.calls[0] == ("chat", [{"role": "system", "content": "s"},
                                     {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": "a"}])
    assert out.prompt_ids[:3] == (1, 2, ord("s") % 90 + 10)


def test_matching_or_empty_model_name_is_accepted():
    validate(raw(model="tiny"), LIMITS, FakeEncoder())
    validate(raw(model=""), LIMITS, FakeEncoder())


def test_sampling_fields_are_carried():
    out = validate(raw(temperature=0.7, top_p=0.9, top_k=5, seed=42, stop_token_ids=(3, 4),
                       ignore_eos=True), LIMITS, FakeEncoder())
    s = out.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop_token_ids, s.ignore_eos) == (
        0.7, 0.9, 5, 42, (3, 4), True)


def test_unset_top_p_means_one():
    assert validate(raw(), LIMITS, FakeEncoder()).sampling.top_p == 1.0


def test_seed_is_concrete_when_sampling_and_kept_when_given():
    a = validate(raw(temperature=1.0), LIMITS, FakeEncoder()).sampling
    b = validate(raw(temperature=1.0), LIMITS, FakeEncoder()).sampling
    assert a.seed is not None and b.seed is not None
    assert 0 <= a.seed < 2**63
    assert a.seed != b.seed  # 62 random bits: a repeat would mean the seed is not random
    assert validate(raw(temperature=1.0, seed=7), LIMITS, FakeEncoder()).sampling.seed == 7


def test_prompt_exactly_filling_the_context_is_allowed():
    out = validate(raw(prompt_ids=tuple([5] * 28), max_tokens=4), LIMITS, FakeEncoder())
    assert len(out.prompt_ids) == 28


# -- identity and model ------------------------------------------------------------------------

@pytest.mark.parametrize("request_id", [
    "", "has space", "tab\there", "new\nline", "x" * (MAX_REQUEST_ID_CHARS + 1), "ü", "a;b",
])
def test_bad_request_ids(request_id):
    msg = invalid(raw(request_id=request_id))
    assert f"request_id must be 1..{MAX_REQUEST_ID_CHARS} characters" in msg


@pytest.mark.parametrize("request_id", [
    "a", "x" * MAX_REQUEST_ID_CHARS, "Abc-123_x.y:z/w@v+u=t",
])
def test_good_request_ids(request_id):
    assert validate(raw(request_id=request_id), LIMITS, FakeEncoder()).request_id == request_id


def test_long_bad_request_id_is_shortened_in_the_message():
    msg = invalid(raw(request_id=" " * 500))
    assert repr(" " * 40) in msg and repr(" " * 41) not in msg


def test_unknown_model():
    msg = invalid(raw(model="gpt-4"))
    assert msg == "unknown model 'gpt-4'; this router serves 'tiny'"


# -- prompt forms ------------------------------------------------------------------------------

def test_empty_prompt():
    msg = invalid(RawRequest(request_id="r", max_tokens=4))
    assert msg.startswith("empty prompt")


def test_empty_values_count_as_unset():
    msg = invalid(RawRequest(request_id="r", prompt="", prompt_ids=(), messages=(),
                             max_tokens=4))
    assert "empty prompt" in msg


@pytest.mark.parametrize("kw, named", [
    ({"prompt": "x", "prompt_ids": (5,)}, "prompt and prompt_ids"),
    ({"prompt": "x", "messages": (ChatTurn("user", "u"),)}, "prompt and messages"),
    ({"prompt_ids": (5,), "messages": (ChatTurn("user", "u"),)}, "prompt_ids and messages"),
    ({"prompt": "x", "prompt_ids": (5,), "messages": (ChatTurn("user", "u"),)},
     "prompt and prompt_ids and messages"),
])
def test_more_than_one_prompt_form(kw, named):
    msg = invalid(raw(**kw))
    assert "give exactly one of prompt, prompt_ids or messages" in msg
    assert f"(got {named})" in msg


def test_unknown_chat_role():
    msgs = (ChatTurn("user", "u"), ChatTurn("tool", "t"))
    msg = invalid(raw(messages=msgs))
    assert msg == "messages[1].role must be one of system, user, assistant, got 'tool'"


def test_chat_role_checked_before_the_template_runs():
    enc = FakeEncoder()
    invalid(raw(messages=(ChatTurn("robot", "x"),)), enc)
    assert enc.calls == []


def test_chat_template_failure_becomes_invalid_request():
    enc = FakeEncoder(template_error=RuntimeError("Conversation roles must alternate"))
    msg = invalid(raw(messages=(ChatTurn("user", "u"),)), enc)
    assert msg == "chat template rejected the messages: Conversation roles must alternate"


# -- sampling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [0, -1])
def test_max_tokens_must_be_positive(max_tokens):
    assert invalid(raw(max_tokens=max_tokens)) == f"max_tokens must be > 0, got {max_tokens}"


def test_negative_temperature():
    assert "temperature must be >= 0" in invalid(raw(temperature=-0.1))


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_refused(name, value):
    msg = invalid(raw(**{name: value}))
    assert msg == f"{name} must be a finite number, got {value}"


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.0001, 2.0])
def test_top_p_outside_unit_interval(top_p):
    assert "top_p must be in (0, 1]" in invalid(raw(top_p=top_p))


def test_top_p_of_one_is_allowed():
    assert validate(raw(top_p=1.0), LIMITS, FakeEncoder()).sampling.top_p == 1.0


def test_negative_top_k():
    assert "top_k must be >= 0" in invalid(raw(top_k=-1))


def test_seed_out_of_range():
    assert "seed must be in [0, 2^63)" in invalid(raw(temperature=1.0, seed=-1))
    assert "seed must be in [0, 2^63)" in invalid(raw(temperature=1.0, seed=2**63))


# -- ids and lengths ---------------------------------------------------------------------------

@pytest.mark.parametrize("ids, index, bad", [((5, 100), 1, 100), ((-1,), 0, -1),
                                              ((5, 6, 1000), 2, 1000)])
def test_prompt_ids_outside_vocab(ids, index, bad):
    msg = invalid(raw(prompt_ids=ids))
    assert msg == f"prompt_ids[{index}] = {bad} is outside the vocabulary [0, 100)"


def test_edge_of_vocab_is_fine():
    assert validate(raw(prompt_ids=(0, 99)), LIMITS, FakeEncoder()).prompt_ids == (0, 99)


def test_stop_ids_outside_vocab():
    msg = invalid(raw(stop_token_ids=(3, 100)))
    assert msg == "stop_token_ids[1] = 100 is outside the vocabulary [0, 100)"


def test_encoded_text_is_checked_against_the_vocab_too():
    small = ModelLimits("tiny", context_length=32, vocab_size=20)
    msg = invalid(raw(prompt="zz"), limits=small)  # 'z' encodes past 20
    assert msg.startswith("prompt_ids[1] = ") and "[0, 20)" in msg


def test_prompt_longer_than_context():
    msg = invalid(raw(prompt_ids=tuple([5] * 33), max_tokens=1))
    assert msg == "prompt has 33 tokens, more than the model's context of 32"


def test_encoded_prompt_longer_than_context():
    msg = invalid(raw(prompt="x" * 40, max_tokens=1))
    assert "prompt has 41 tokens" in msg  # 40 chars + BOS


def test_prompt_plus_max_tokens_beyond_context():
    msg = invalid(raw(prompt_ids=tuple([5] * 30), max_tokens=3))
    assert msg == ("prompt (30 tokens) + max_tokens (3) = 33 exceeds the model's context "
                   "of 32")


def test_checks_run_cheapest_first():
    # Bad id and bad everything else: the id is reported; an unknown model beats a bad prompt.
    assert "request_id" in invalid(RawRequest(request_id="", model="x", max_tokens=0))
    assert "unknown model" in invalid(RawRequest(request_id="r", model="x", max_tokens=0))
    enc = FakeEncoder()
    assert "max_tokens" in invalid(raw(prompt="hello", max_tokens=0), enc)
    assert enc.calls == [], "sampling is checked before the prompt is tokenised"


# -- resuming a request on another router ------------------------------------------------------

def test_resume_tokens_are_checked_and_kept():
    ok = validate(raw(max_tokens=4, resume_token_ids=(8, 9)), LIMITS, FakeEncoder())
    assert ok.resume_ids == (8, 9) and ok.sampling.max_tokens == 4
    assert "resume_token_ids" in invalid(raw(resume_token_ids=(8, 100)))
    assert "more than max_tokens" in invalid(raw(max_tokens=1, resume_token_ids=(8, 9)))
    # all of them already streamed (the router died before its final message): valid, the
    # router finishes it without generating
    assert validate(raw(max_tokens=2, resume_token_ids=(8, 9)), LIMITS, FakeEncoder())


# -- the prompt's size, before any tokenising ----------------------------------------------------

BYTES_LIMITED = ModelLimits("tiny", context_length=32, vocab_size=100, max_prompt_bytes=10)


def test_a_prompt_over_the_byte_limit_is_refused_untokenised():
    enc = FakeEncoder()
    with pytest.raises(InvalidRequest) as err:
        validate(raw(prompt="x" * 11), BYTES_LIMITED, enc)
    assert str(err.value).startswith("prompt is 11 bytes, more than this router's limit of 10")
    assert err.value.param == "prompt" and enc.calls == []
    assert validate(raw(prompt="x" * 10, max_tokens=1), BYTES_LIMITED, enc)


def test_bytes_are_utf8_and_chat_turns_count_roles_and_contents():
    assert prompt_bytes(raw(prompt="é☕")) == 2 + 3
    msgs = (ChatTurn("user", "abc"), ChatTurn("system", "é"))
    assert prompt_bytes(raw(messages=msgs)) == 4 + 3 + 6 + 2
    enc = FakeEncoder()
    with pytest.raises(InvalidRequest) as err:
        validate(raw(messages=msgs), BYTES_LIMITED, enc)
    assert err.value.param == "messages" and enc.calls == []


def test_too_many_prompt_ids_are_refused_before_anything_else_of_the_prompt():
    with pytest.raises(InvalidRequest) as err:
        check_before_encoding(raw(prompt_ids=tuple([10**6] * 33), max_tokens=0), LIMITS)
    assert "prompt has 33 tokens" in str(err.value) and err.value.param == "prompt_ids"


def test_check_before_encoding_never_tokenises_and_returns_the_sampling():
    sampling = check_before_encoding(raw(prompt="hi", max_tokens=3), BYTES_LIMITED)
    assert sampling.max_tokens == 3


@pytest.mark.parametrize("request_kw, param", [
    (dict(request_id=""), "request_id"), (dict(model="gpt-4"), "model"),
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=2.0), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(temperature=1.0, seed=-1), "seed"), (dict(stop_token_ids=(100,)), "stop_token_ids"),
    (dict(prompt_ids=(1, 100)), "prompt_ids"), (dict(prompt_ids=(5,) * 30), "max_tokens"),
    (dict(prompt="x" * 40, max_tokens=1), "prompt"),
    (dict(messages=(ChatTurn("robot", "x"),)), "messages"),
    (dict(resume_token_ids=(100,)), "resume_token_ids"),
])
def test_every_refusal_names_the_field_at_fault(request_kw, param):
    with pytest.raises(InvalidRequest) as err:
        validate(raw(**request_kw), LIMITS, FakeEncoder())
    assert err.value.param == param, str(err.value)
