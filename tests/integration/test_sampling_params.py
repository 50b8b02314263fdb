"""Stop strings, n, logprobs, presence / frequency penalties and logit_bias through the cluster
(tiny model, 1 prefill, 1 decode, 2 expert workers, every service a real process), over gRPC
and over HTTP with the real `openai` client, against the reference engine (the master
invariant) and, for HTTP, OpenAI's OpenAPI document.

Logprobs tolerance: LOGIT_TOL (1e-3, services/engine/compare.py), the project's bound on fp32
logits of two implementations that differ only in summation order; a log-softmax moves by at
most twice the largest logit difference, and the measured differences are ~1e-6.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from services.client import InferenceClient
from services.engine.compare import LOGIT_TOL
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.loader import load_model
from services.model.tokenizer import Tokenizer
from tests.integration.cluster_helpers import http_cluster_fixtures
from tests.openai_schema import errors

PROMPT = "the quick brown fox"
MAX_TOKENS = 12


cluster, client = http_cluster_fixtures(max_inflight=32)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer) -> ReferenceEngine:
    return ReferenceEngine(load_model(tiny_model_dir), record_logits=True, tokenizer=tokenizer)


def expected(engine, tokenizer, **params):
    """The reference engine's completion of PROMPT (encoded as the router encodes it)."""
    params = {"max_tokens": MAX_TOKENS, "ignore_eos": True, **params}
    return engine.generate([GenerationRequest("ref", tokenizer.encode(PROMPT),
                                              SamplingParams(**params))])[0]


def remote(cluster, **params):
    async def go():
        async with InferenceClient(cluster.router_endpoint) as c:
            return await c.generate(prompt=PROMPT, params=SamplingParams(
                **{"max_tokens": MAX_TOKENS, "ignore_eos": True, **params}))
    return asyncio.run(go())


def conforms(schema: str, body) -> None:
    found = errors(schema, body)
    assert found == [], f"{schema}: {found}\n{json.dumps(body)[:2000]}"


def a_stop_string(text: str) -> str:
    """Two characters from the middle of a completion's text: a stop string that matches."""
    at = len(text) // 2
    return text[at:at + 2]


REPEAT = {"frequency_penalty": -2.0, "presence_penalty": -2.0}  # rewards every repeat


# -- gRPC against the reference engine -------------------------------------------------------

def test_stop_strings_end_where_the_reference_ends(cluster, engine, tokenizer):
    free = expected(engine, tokenizer)
    stop = a_stop_string(free.text)
    want = expected(engine, tokenizer, stop=(stop, "never-in-this-text"))
    got = remote(cluster, stop=(stop, "never-in-this-text"))
    assert want.finish_reason == "stop" and want.text == free.text[:free.text.find(stop)]
    assert (got.text, got.token_ids, got.finish_reason) == (
        want.text, want.token_ids, want.finish_reason)
    assert got.server_usage.completion_tokens == len(want.token_ids) < MAX_TOKENS


@pytest.mark.parametrize("params", [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 2.0},
    {"frequency_penalty": -1.0, "presence_penalty": 0.5},
    REPEAT,
    {"logit_bias": ((7, 40.0), (9, 38.0))},
    {"temperature": 0.9, "seed": 5, "frequency_penalty": 1.0},
], ids=["presence", "frequency", "both", "repeat", "logit_bias", "seeded"])
def test_penalties_and_logit_bias_give_the_references_tokens(cluster, engine, tokenizer, params):
    want = expected(engine, tokenizer, **params)
    got = remote(cluster, **params)
    assert got.token_ids == want.token_ids, params
    if "logit_bias" in params:  # the bias is large enough to decide every token
        assert set(want.token_ids) <= {7, 9}


def test_penalties_change_what_greedy_decoding_gives(engine, tokenizer):
    """The test above could not fail if a penalty did nothing: it does something here (the
    random tiny model rarely repeats a token in 12, so a negative penalty shows it best)."""
    plain = expected(engine, tokenizer).token_ids
    repeated = expected(engine, tokenizer, **REPEAT).token_ids
    assert repeated != plain and len(set(repeated)) < len(set(plain))


def test_logprobs_are_the_references(cluster, engine, tokenizer):
    want = expected(engine, tokenizer, logprobs=3)
    got = remote(cluster, logprobs=3)
    assert got.token_ids == want.token_ids and len(got.logprobs) == MAX_TOKENS
    for g, w in zip(got.logprobs, want.logprobs, strict=True):
        assert g.token_id == w.token_id and abs(g.logprob - w.logprob) <= LOGIT_TOL
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
        assert all(abs(a - b) <= LOGIT_TOL for (_, a), (_, b) in zip(g.top, w.top, strict=True))


# -- HTTP, with the openai client ----------------------------------------------------------------

GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


def test_http_stop_string_whole_and_streamed(client, engine, tokenizer):
    free = expected(engine, tokenizer)
    stop = a_stop_string(free.text)
    want = expected(engine, tokenizer, stop=(stop,))
    raw = client.completions.with_raw_response.create(model="", prompt=PROMPT, stop=stop,
                                                      **GREEDY)
    conforms("CreateCompletionResponse", raw.http_response.json())
    out = raw.parse()
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model="", prompt=PROMPT, stop=[stop], stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_http_completion_logprobs(client, engine, tokenizer):
    want = expected(engine, tokenizer, logprobs=2)
    raw = client.completions.with_raw_response.create(model="", prompt=PROMPT, logprobs=2,
                                                      **GREEDY)
    body = raw.http_response.json()
    conforms("CreateCompletionResponse", body)
    lp = raw.parse().choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == MAX_TOKENS
    assert lp.tokens == [tokenizer.token_bytes(t).decode("utf-8", "replace")
                         for t in want.token_ids]
    assert all(abs(g - w.logprob) <= LOGIT_TOL
               for g, w in zip(lp.token_logprobs, want.logprobs, strict=True))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_http_chat_logprobs_whole_and_streamed_conform(client):
    kwargs = dict(model="", messages=[{"role": "user", "content": "hello"}], logprobs=True,
                  top_logprobs=3, **GREEDY)
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    conforms("CreateChatCompletionResponse", raw.http_response.json())
    content = raw.parse().choices[0].logprobs.content
    assert len(content) == MAX_TOKENS
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - LOGIT_TOL
               for t in content)
    streamed = []
    with client.chat.completions.with_streaming_response.create(stream=True, **kwargs) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                conforms("CreateChatCompletionStreamResponse", chunk)
                streamed += (chunk["choices"][0]["logprobs"] or {}).get("content") or []
    assert [t["token"] for t in streamed] == [t.token for t in content]


def test_http_n_choices_are_seeded_one_apart(client):
    kwargs = dict(model="", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, seed=40,
                  extra_body={"ignore_eos": True})
    raw = client.completions.with_raw_response.create(n=3, **kwargs)
    conforms("CreateCompletionResponse", raw.http_response.json())
    out = raw.parse()
    assert [c.index for c in out.choices] == [0, 1, 2]
    singles = [client.completions.create(**{**kwargs, "seed": 40 + i}) for i in range(3)]
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles]
    assert len({s.choices[0].text for s in singles}) > 1  # different seeds, different draws
    assert out.usage.completion_tokens == 3 * MAX_TOKENS  # the prompt counted once:
    assert out.usage.prompt_tokens == singles[0].usage.prompt_tokens


def test_http_streamed_n_choices_interleave_and_add_up(client):
    kwargs = dict(model="", messages=[{"role": "user", "content": "hi"}], n=2, seed=3,
                  temperature=0.8, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True},
                                                 **kwargs))
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * MAX_TOKENS
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
