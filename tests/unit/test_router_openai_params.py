"""OpenAI request bodies -> RawRequest: what is served, accepted at its default only, refused."""

from __future__ import annotations

import pytest

from services.router.openai_params import (
    DEFAULT_MAX_TOKENS,
    MAX_CHOICES,
    MAX_GENERATIONS,
    BadRequest,
    parse_body,
)
from services.router.validation import ChatTurn


def refused(body: dict, chat: bool = False) -> BadRequest:
    with pytest.raises(BadRequest) as err:
        parse_body(body, chat, "r-1")
    return err.value


def test_served_fields_become_the_raw_request():
    req = parse_body({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.5,
                      "top_p": 0.9, "seed": 3, "top_k": 7, "ignore_eos": True,
                      "stop_token_ids": [4], "stream": True,
                      "stream_options": {"include_usage": True}, "user": "u1"}, False, "r-1")
    raw = req.raw
    assert (raw.request_id, raw.model, raw.prompt, raw.max_tokens, raw.temperature) == (
        "r-1", "m", "hi", 5, 0.5)
    assert (raw.top_p, raw.seed, raw.top_k, raw.ignore_eos, raw.stop_token_ids) == (
        0.9, 3, 7, True, (4,))
    assert req.stream and req.include_usage and req.user == "u1"


def test_defaults_and_null_mean_unset():
    req = parse_body({"prompt": [1, 2], "temperature": None, "top_p": None, "seed": None,
                      "stream": None}, False, "r")
    assert req.raw.prompt_ids == (1, 2) and req.raw.max_tokens == DEFAULT_MAX_TOKENS
    assert req.raw.temperature == 1.0 and req.raw.top_p is None and req.raw.seed is None
    assert not req.stream and not req.include_usage


def test_chat_messages_and_max_completion_tokens():
    req = parse_body({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                      "max_completion_tokens": 9}, True, "r")
    assert req.raw.messages == (ChatTurn("user", "x"),)
    assert req.raw.max_tokens == 9 and req.params["max_tokens"] == "max_completion_tokens"
    assert req.params["prompt_ids"] == "prompt"


def test_the_sampling_parameters_openai_names_are_served():
    req = parse_body({"prompt": "hi", "n": 3, "presence_penalty": 0.5,
                      "frequency_penalty": -1, "logit_bias": {"7": -100, "12": 3.5},
                      "stop": ["\n\n", "END"], "logprobs": 2}, False, "r")
    raw = req.raw
    assert req.n == 3 and (raw.presence_penalty, raw.frequency_penalty) == (0.5, -1.0)
    assert raw.logit_bias == ((7, -100.0), (12, 3.5)) and raw.stop == ("\n\n", "END")
    assert raw.logprobs == 2 and req.params["logprobs"] == "logprobs"


def test_one_stop_string_and_null_defaults():
    assert parse_body({"prompt": "hi", "stop": "x"}, False, "r").raw.stop == ("x",)
    raw = parse_body({"prompt": "hi", "stop": None, "n": None, "logprobs": None,
                      "logit_bias": None, "presence_penalty": None}, False, "r").raw
    assert (raw.stop, raw.logprobs, raw.logit_bias, raw.presence_penalty) == ((), None, (), 0.0)


def test_chat_logprobs_is_a_switch_and_top_logprobs_the_number():
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert parse_body({**chat, "logprobs": True}, True, "r").raw.logprobs == 0
    req = parse_body({**chat, "logprobs": True, "top_logprobs": 5}, True, "r")
    assert req.raw.logprobs == 5 and req.params["logprobs"] == "top_logprobs"
    assert parse_body({**chat, "logprobs": False}, True, "r").raw.logprobs is None
    assert refused({**chat, "top_logprobs": 2}, chat=True).param == "top_logprobs"
    assert refused({**chat, "logprobs": 3}, chat=True).param == "logprobs"


@pytest.mark.parametrize("key, value", [
    ("echo", False), ("best_of", 1), ("suffix", ""), ("echo", None),
])
def test_completion_parameters_at_the_value_that_changes_nothing(key, value):
    assert parse_body({"prompt": "hi", key: value}, False, "r").raw.prompt == "hi"


@pytest.mark.parametrize("key, value", [
    ("tools", []), ("tool_choice", "none"),
    ("parallel_tool_calls", True), ("response_format", {"type": "text"}),
    ("modalities", ["text"]), ("store", False), ("service_tier", "auto"),
])
def test_chat_parameters_at_the_value_that_changes_nothing(key, value):
    body = {"messages": [{"role": "user", "content": "x"}], key: value}
    assert parse_body(body, True, "r").raw.messages


@pytest.mark.parametrize("key, value", [
    ("echo", True), ("best_of", 2), ("suffix", "x"), ("tools", [{}]), ("frobnicate", 1),
])
def test_anything_else_is_refused_naming_the_parameter(key, value):
    err = refused({"prompt": "hi", key: value})
    assert err.param == key and repr(key) in str(err)


@pytest.mark.parametrize("key, value", [
    ("n", 0), ("n", 17), ("n", True), ("n", 1.5), ("stop", 5), ("stop", ["a", 1]),
    ("logit_bias", []), ("logit_bias", {"a": 1}), ("logit_bias", {"-1": 1}),
    ("logit_bias", {"1": "x"}), ("presence_penalty", "x"), ("logprobs", True),
])
def test_bad_values_of_served_parameters_name_them(key, value):
    assert refused({"prompt": "hi", key: value}).param == key


def test_a_chat_only_parameter_is_unknown_to_completions_and_the_reverse():
    assert refused({"prompt": "hi", "tools": []}).param == "tools"
    assert refused({"prompt": "hi", "top_logprobs": 1}).param == "top_logprobs"
    assert refused({"messages": [], "echo": False}, chat=True).param == "echo"


def test_the_error_says_what_would_be_accepted():
    assert "only false is accepted" in str(refused({"prompt": "hi", "echo": True}))


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": {"x": 1}}, "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": []}, "stream_options"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "seed": True}, "seed"),
    ({"prompt": "hi", "model": 5}, "model"),
    ({"prompt": "hi", "stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
])
def test_wrong_types_and_forms_name_the_parameter(body, param):
    assert refused(body).param == param


@pytest.mark.parametrize("messages", [
    "hi", [{"role": "user"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
    [{"role": "user", "content": "x", "name": "bob"}],
])
def test_messages_must_be_role_and_string_content(messages):
    assert refused({"messages": messages}, chat=True).param == "messages"


def test_include_obfuscation_false_is_what_epserve_does():
    body = {"prompt": "hi", "stream": True, "stream_options": {"include_obfuscation": False}}
    assert not parse_body(body, False, "r").include_usage


def test_body_must_be_an_object():
    assert refused([1, 2]).param is None  # type: ignore[arg-type]


# -- a batch of prompts -------------------------------------------------------------------------

def test_a_batch_of_strings_is_one_request_per_prompt_sharing_the_rest():
    req = parse_body({"prompt": ["a b", "c", "d e f"], "n": 2, "max_tokens": 5, "seed": 9,
                      "stop": ["x"], "logprobs": 1}, False, "r-1")
    assert [r.prompt for r in req.prompts] == ["a b", "c", "d e f"]
    assert req.prompts[0] == req.raw and req.n == 2
    for r in req.prompts:
        assert r.prompt_ids == () and r.request_id == "r-1"
        assert (r.max_tokens, r.seed, r.stop, r.logprobs) == (5, 9, ("x",), 1)


def test_a_batch_of_token_id_lists():
    req = parse_body({"prompt": [[1, 2], [3], [4, 5, 6]]}, False, "r")
    assert [r.prompt_ids for r in req.prompts] == [(1, 2), (3,), (4, 5, 6)]
    assert all(r.prompt == "" for r in req.prompts)


@pytest.mark.parametrize("prompt, text, ids", [
    ("hi", "hi", ()), ([7, 8], "", (7, 8)), (["hi"], "hi", ()), ([[7, 8]], "", (7, 8)),
])
def test_one_prompt_in_any_form_is_no_batch(prompt, text, ids):
    req = parse_body({"prompt": prompt}, False, "r")
    assert req.batch == () and req.prompts == (req.raw,)
    assert (req.raw.prompt, req.raw.prompt_ids) == (text, ids)


def test_chat_has_one_prompt():
    req = parse_body({"messages": [{"role": "user", "content": "x"}], "n": 3}, True, "r")
    assert req.prompts == (req.raw,)


@pytest.mark.parametrize("prompt", [
    [],  # no prompt at all
    ["a", ""], [""],  # an empty string in a batch
    [[1], []], [[]],  # an empty token list in a batch
    ["a", [1]], [1, "a"], [[1], 2], ["a", None],  # forms mixed
    [1.5], [True, 2], [[1, "2"]], [[1.0]], [[1], [True]],  # tokens that are not integers
    [["a"]], [[[1]]],  # nested deeper than OpenAI's forms
])
def test_bad_batches_are_refused_naming_prompt(prompt):
    err = refused({"prompt": prompt})
    assert err.param == "prompt", err


def test_the_refusal_says_which_prompt():
    assert "prompt[1]" in str(refused({"prompt": ["a", ""]}))
    assert "prompt[2]" in str(refused({"prompt": [[1], [2], [3, "x"]]}))


def test_prompts_times_n_is_bounded():
    prompts = ["p"] * (MAX_GENERATIONS // MAX_CHOICES)
    assert len(parse_body({"prompt": prompts, "n": MAX_CHOICES}, False, "r").prompts) == len(
        prompts)
    err = refused({"prompt": [*prompts, "one more"], "n": MAX_CHOICES})
    assert err.param == "prompt" and str(MAX_GENERATIONS) in str(err)
    assert len(parse_body({"prompt": ["p"] * MAX_GENERATIONS}, False, "r").prompts) == (
        MAX_GENERATIONS)
    assert refused({"prompt": [[1]] * (MAX_GENERATIONS + 1)}).param == "prompt"
