"""The router's HTTP API against OpenAI's published OpenAPI document, with the real `openai`
client (tiny model, 1 prefill, 1 decode, 2 expert workers, every service a real process).

Every body the router returns, every streamed chunk and every error body is validated against
the document's component schemas (tests/openai_schema.py): CreateCompletionResponse,
CreateChatCompletionResponse, CreateChatCompletionStreamResponse, ListModelsResponse, Model,
CompletionUsage, ErrorResponse. The client must also accept them as they are (it parses every
response it is given). One rule of the document is relaxed, for streamed completions only, and
said where: the document gives streamed and whole completions one schema, whose
`finish_reason` is not nullable, yet a streamed completion's chunks before the last carry
`finish_reason: null` (as OpenAI's own streams do).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.integration.cluster_helpers import http_cluster_fixtures
from tests.openai_schema import errors

MAX_TOKENS = 6
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "hello there"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


cluster, client = http_cluster_fixtures(max_inflight=16)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def conforms(schema: str, body, relax=None) -> None:
    found = errors(schema, body, relax)
    assert found == [], f"{schema}: {found}\n{json.dumps(body)[:2000]}"


def completion_chunk_finish_reason_nullable(schema: dict) -> None:
    """The one relaxation (see the module docstring): streamed completions' finish_reason."""
    props = schema["properties"]["choices"]["items"]["properties"]
    props["finish_reason"] = {"anyOf": [props["finish_reason"], {"type": "null"}]}


def sse_events(response) -> list:
    """The `data:` payloads of a raw server-sent-event stream, `[DONE]` kept as a string."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def post_raw(cluster, path: str, data: bytes, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(cluster.http_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- /v1/models ---------------------------------------------------------------------------------

def test_models_list_conforms_and_the_client_reads_it(client):
    raw = client.models.with_raw_response.list()
    conforms("ListModelsResponse", raw.http_response.json())
    models = raw.parse()
    assert len(models.data) == 1 and models.data[0].object == "model"


def test_model_retrieve_conforms(client, model):
    raw = client.models.with_raw_response.retrieve(model)
    conforms("Model", raw.http_response.json())
    assert raw.parse().id == model


def test_unknown_model_retrieve_is_a_404_error_response(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    conforms("ErrorResponse", err.value.response.json())
    assert err.value.code == "model_not_found"


# -- /v1/completions ----------------------------------------------------------------------------

def test_completion_conforms(client, model):
    raw = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, **GREEDY)
    conforms("CreateCompletionResponse", raw.http_response.json())
    out = raw.parse()
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.completion_tokens == MAX_TOKENS


def test_completion_usage_reports_cached_prompt_tokens(client, model):
    body = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, **GREEDY).http_response.json()
    conforms("CompletionUsage", body["usage"])
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert isinstance(cached, int) and 0 <= cached <= body["usage"]["prompt_tokens"]


def test_streamed_completion_chunks_conform(client, model):
    with client.completions.with_streaming_response.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True, **GREEDY) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        conforms("CreateCompletionResponse", chunk, completion_chunk_finish_reason_nullable)
        assert "usage" not in chunk  # not asked for (stream_options.include_usage)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in events[:-2])


def test_streamed_completion_usage_is_a_final_chunk_of_its_own(client, model):
    with client.completions.with_streaming_response.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}, **GREEDY) as resp:
        events = sse_events(resp)
    *chunks, last, done = events
    assert done == "[DONE]"
    conforms("CreateCompletionResponse", last)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == MAX_TOKENS
    for chunk in chunks:  # the document has no null usage for completions: it is left out
        conforms("CreateCompletionResponse", chunk, completion_chunk_finish_reason_nullable)
        assert "usage" not in chunk and len(chunk["choices"]) == 1


def test_streamed_completion_through_the_client_equals_the_whole_one(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                      **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


# -- /v1/chat/completions -----------------------------------------------------------------------

def test_chat_completion_conforms(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, **GREEDY)
    body = raw.http_response.json()
    conforms("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    assert raw.parse().choices[0].message.role == "assistant"


def test_chat_completion_usage_reports_cached_prompt_tokens(client, model):
    body = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, **GREEDY).http_response.json()
    conforms("CompletionUsage", body["usage"])
    assert isinstance(body["usage"]["prompt_tokens_details"]["cached_tokens"], int)


def test_streamed_chat_chunks_conform(client, model):
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
            **GREEDY) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        conforms("CreateChatCompletionStreamResponse", chunk)
        assert "usage" not in chunk
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_streamed_chat_usage_is_a_final_chunk_and_null_before(client, model):
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}, **GREEDY) as resp:
        events = sse_events(resp)
    *chunks, last, done = events
    assert done == "[DONE]"
    conforms("CreateChatCompletionStreamResponse", last)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == MAX_TOKENS
    assert isinstance(last["usage"]["prompt_tokens_details"]["cached_tokens"], int)
    for chunk in chunks:
        conforms("CreateChatCompletionStreamResponse", chunk)
        assert "usage" in chunk and chunk["usage"] is None and len(chunk["choices"]) == 1


def test_streamed_chat_through_the_client_equals_the_whole_one(client, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES,
                                           max_tokens=MAX_TOKENS, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_parameters_at_their_defaults_are_accepted(client, model):
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=2, presence_penalty=0, frequency_penalty=0,
        n=1, logprobs=False, stop=None, user="someone", **GREEDY)
    assert out.usage.completion_tokens == 2
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, n=1, echo=False,
                                    best_of=1, logprobs=None, presence_penalty=0.0, **GREEDY)
    assert out.usage.completion_tokens == 2


# -- errors: every refusal names the parameter it refuses ---------------------------------------

COMPLETION_REFUSALS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"n": 17}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "!"}, "suffix"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),  # outside the vocabulary
    ({"top_p": 2.0}, "top_p"),
    ({"extra_body": {"no_such_parameter": 1}}, "no_such_parameter"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
]


@pytest.mark.parametrize("kwargs, param", COMPLETION_REFUSALS, ids=[p for _, p in
                                                                     COMPLETION_REFUSALS])
def test_completion_refusal_is_an_error_response_naming_the_parameter(client, model, kwargs,
                                                                      param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=PROMPT, **{"max_tokens": 4, **kwargs})
    conforms("ErrorResponse", err.value.response.json())
    assert err.value.param == param, err.value.response.json()


CHAT_REFUSALS = [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"extra_body": {"messages": [{"role": "user", "content": 5}]}}, "messages"),
]


@pytest.mark.parametrize("kwargs, param", CHAT_REFUSALS, ids=[p for _, p in CHAT_REFUSALS])
def test_chat_refusal_is_an_error_response_naming_the_parameter(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES,
                                       **{"max_tokens": 4, **kwargs})
    conforms("ErrorResponse", err.value.response.json())
    assert err.value.param == param, err.value.response.json()


def test_unknown_model_is_a_404_naming_the_model(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-5", prompt=PROMPT, max_tokens=4)
    conforms("ErrorResponse", err.value.response.json())
    assert err.value.param == "model" and err.value.code == "model_not_found"


def test_invalid_json_is_an_error_response(cluster):
    status, body = post_raw(cluster, "/v1/completions", b"{not json")
    assert status == 400
    conforms("ErrorResponse", body)


def test_unknown_route_is_an_error_response(cluster):
    status, body = post_raw(cluster, "/v1/embeddings", b"{}")
    assert status == 404
    conforms("ErrorResponse", body)


def test_wrong_method_is_an_error_response(cluster):
    status, body = post_raw(cluster, "/v1/completions", None, method="GET")
    assert status == 405
    conforms("ErrorResponse", body)
