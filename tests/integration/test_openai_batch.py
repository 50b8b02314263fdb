"""A batch of prompts on /v1/completions, as OpenAI and vLLM serve it, with the real `openai`
client against the real cluster (tiny model, 1 prefill, 1 decode, 2 expert workers, every
service a real process).

A batch of P prompts with n choices each is P * n choices, prompt p's choice c at index
p * n + c, whole or streamed; each is a generation of its own, so its text is what the same
prompt alone gives (greedy; seeded: prompt p alone with the same seed and n). The usage adds
every prompt once and every choice's completion tokens. Bodies and chunks are validated
against OpenAI's OpenAPI document as in test_openai_conformance.py (streamed completions with
the one relaxation said there); bad batches are 400s naming `prompt`.
"""

from __future__ import annotations

import openai
import pytest

from services.router.openai_params import MAX_GENERATIONS
from tests.integration.cluster_helpers import http_cluster_fixtures
from tests.integration.test_openai_conformance import (
    completion_chunk_finish_reason_nullable,
    conforms,
    sse_events,
)

MAX_TOKENS = 6
PROMPTS = ["the quick brown fox", "hello there", "a b c d e f g"]
TOKEN_PROMPTS = [[10, 20, 30, 40], [50, 60], [7, 8, 9, 11, 12, 13]]
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}
SEEDED = {"temperature": 1.0, "seed": 40, "max_tokens": MAX_TOKENS,
          "extra_body": {"ignore_eos": True}}


cluster, client = http_cluster_fixtures(max_inflight=16)


def alone(client, prompts, n: int = 1, **kwargs) -> list:
    """Each prompt as a request of its own: one completion per prompt."""
    return [client.completions.create(model="", prompt=p, n=n, **kwargs) for p in prompts]


def batch(client, prompts, n: int = 1, **kwargs) -> tuple[dict, object]:
    """The batch's raw body (checked against the document) and the client's parse of it."""
    raw = client.completions.with_raw_response.create(model="", prompt=prompts, n=n, **kwargs)
    body = raw.http_response.json()
    conforms("CreateCompletionResponse", body)
    return body, raw.parse()


def check_usage_adds_up(usage: dict, singles: list, choices: int) -> None:
    assert usage["prompt_tokens"] == sum(s.usage.prompt_tokens for s in singles)
    assert usage["completion_tokens"] == choices * MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # cached or not, every prompt token is counted once (the cache's state varies by run)
    assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == (
        usage["prompt_tokens"])
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_cache_hit_tokens"]


@pytest.mark.parametrize("prompts", [PROMPTS, TOKEN_PROMPTS], ids=["strings", "token_ids"])
def test_a_batch_gives_each_prompt_what_it_gives_alone(client, prompts):
    singles = alone(client, prompts, **GREEDY)
    body, out = batch(client, prompts, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles]
    assert all(c.finish_reason == "length" for c in out.choices)
    check_usage_adds_up(body["usage"], singles, len(prompts))


@pytest.mark.parametrize("prompts", [PROMPTS, TOKEN_PROMPTS], ids=["strings", "token_ids"])
def test_n_choices_of_each_prompt_in_openais_index_order(client, prompts):
    """Seeded, so choices differ: index p * n + c is prompt p's choice c alone."""
    singles = alone(client, prompts, n=2, **SEEDED)
    body, out = batch(client, prompts, n=2, **SEEDED)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [c.text for s in singles for c in s.choices]
    assert any(s.choices[0].text != s.choices[1].text for s in singles)  # seed + c differs
    check_usage_adds_up(body["usage"], singles, 6)


@pytest.mark.parametrize("prompts", [PROMPTS, TOKEN_PROMPTS], ids=["strings", "token_ids"])
def test_a_streamed_batch_carries_each_choices_index(client, prompts):
    _, whole = batch(client, prompts, n=2, **GREEDY)
    with client.completions.with_streaming_response.create(
            model="", prompt=prompts, n=2, stream=True, stream_options={"include_usage": True},
            **GREEDY) as resp:
        events = sse_events(resp)
    *chunks, last, done = events
    assert done == "[DONE]"
    texts, finished = [""] * 6, []
    for chunk in chunks:
        conforms("CreateCompletionResponse", chunk, completion_chunk_finish_reason_nullable)
        assert "usage" not in chunk and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finished.append(choice["index"])
    assert sorted(finished) == list(range(6))
    assert texts == [c.text for c in whole.choices]
    conforms("CreateCompletionResponse", last)
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    assert last["usage"]["completion_tokens"] == 6 * MAX_TOKENS


def test_a_streamed_batch_through_the_client(client):
    chunks = list(client.completions.create(model="", prompt=PROMPTS, stream=True, **GREEDY))
    texts = [""] * len(PROMPTS)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [s.choices[0].text for s in alone(client, PROMPTS, **GREEDY)]


def test_a_batch_with_stop_and_logprobs_applies_them_to_each_prompt(client):
    singles = alone(client, PROMPTS, logprobs=2, stop=["e"], **GREEDY)
    body, out = batch(client, PROMPTS, logprobs=2, stop=["e"], **GREEDY)
    for got, want in zip(out.choices, singles, strict=True):
        assert (got.text, got.finish_reason) == (want.choices[0].text,
                                                 want.choices[0].finish_reason)
        assert got.logprobs.tokens == want.choices[0].logprobs.tokens
        assert got.logprobs.text_offset[:1] in ([], [0])  # offsets start over per choice


BAD_BATCHES = [
    ([], "empty"),
    (["a", ""], "empty_string"),
    ([[1, 2], []], "empty_token_list"),
    (["a", [1, 2]], "mixed_forms"),
    ([[1, 2], "a"], "mixed_forms_reversed"),
    ([[1, 2.5]], "float_token"),
    ([["1"]], "string_token"),
    (["p"] * (MAX_GENERATIONS + 1), "too_many_prompts"),
    ([[10, 20], [10**9]], "token_outside_the_vocabulary"),
    ([[10, 20], [10] * 100_000], "prompt_longer_than_the_context"),
]


@pytest.mark.parametrize("prompt", [b for b, _ in BAD_BATCHES], ids=[i for _, i in BAD_BATCHES])
def test_a_bad_batch_is_a_400_naming_prompt(client, prompt):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="", prompt=prompt, max_tokens=4)
    conforms("ErrorResponse", err.value.response.json())
    assert err.value.param == "prompt", err.value.response.json()


def test_too_many_choices_in_all_is_a_400_naming_prompt(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="", prompt=["p"] * 5, n=16, max_tokens=4)
    conforms("ErrorResponse", err.value.response.json())
    assert err.value.param == "prompt" and str(MAX_GENERATIONS) in err.value.message


def test_a_batch_is_refused_whole_saying_which_prompt(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="", prompt=[[10, 20], [10] * 100_000], max_tokens=4)
    assert "prompt[1]: " in err.value.message and "context" in err.value.message
