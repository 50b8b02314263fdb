"""n choices of each prompt side by side (router/openai_choices.py) and their logprobs
objects."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.protos_gen.epserve.v1 import inference_pb2
from services.router.flow import RequestFailed
from services.router.openai_choices import Choices, choice_requests, usage
from services.router.openai_logprobs import ChoiceLogprobs
from services.router.validation import RawRequest


def delta(text: str, token: int = 1, logprob: float | None = None):
    d = inference_pb2.TokenDelta(token_ids=[token], text=text)
    if logprob is not None:
        d.logprobs.append(inference_pb2.TokenLogprobs(logprob=logprob, top=[
            inference_pb2.TopLogprob(token_id=token, logprob=logprob)]))
    return inference_pb2.GenerateResponse(delta=d)


def final(tokens: int, prompt: int = 5, cached: int = 0):
    return inference_pb2.GenerateResponse(final=inference_pb2.GenerateFinal(
        finish_reason="length", usage=inference_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=tokens, prompt_cache_hit_tokens=cached,
            prompt_cache_miss_tokens=prompt - cached)))


async def stream(*items, fail: Exception | None = None, pause: float = 0.0):
    for item in items:
        await asyncio.sleep(pause)
        yield item
    if fail is not None:
        raise fail


def test_choice_i_gets_its_own_id_and_seed_plus_i():
    raw = RawRequest("r", prompt="x", max_tokens=3, temperature=1.0, seed=7)
    assert choice_requests([raw], 1) == [raw]
    three = choice_requests([raw], 3)
    assert [r.request_id for r in three] == ["r.0", "r.1", "r.2"]
    assert [r.seed for r in three] == [7, 8, 9]
    assert choice_requests([RawRequest("r", seed=None)], 2)[1].seed is None


def test_a_batch_runs_n_choices_of_each_prompt_in_openais_index_order():
    """Index prompt * n + choice; prompt p's choice c is seeded seed + c, as p alone is."""
    prompts = [RawRequest("r", prompt=t, temperature=1.0, seed=7) for t in ("a", "b", "c")]
    six = choice_requests(prompts, 2)
    assert [(r.request_id, r.prompt, r.seed) for r in six] == [
        ("r.0", "a", 7), ("r.1", "a", 8), ("r.2", "b", 7), ("r.3", "b", 8), ("r.4", "c", 7),
        ("r.5", "c", 8)]
    assert [r.request_id for r in choice_requests(prompts, 1)] == ["r.0", "r.1", "r.2"]
    alone = choice_requests(prompts[1:2], 2)
    assert [r.seed for r in alone] == [r.seed for r in six[2:4]]


def test_batch_usage_counts_each_prompt_once_and_every_choice():
    # two prompts (5 and 8 tokens, 4 and 0 of them cached), n = 2
    finals = [final(3, 5, 4).final, final(2, 5, 4).final, final(6, 8).final,
              final(1, 8).final]
    u = usage(finals, 2)
    assert (u.prompt_tokens, u.completion_tokens) == (13, 12)
    assert (u.prompt_cache_hit_tokens, u.prompt_cache_miss_tokens) == (4, 9)
    assert usage(finals, 1).prompt_tokens == 26  # four prompts of one choice each


async def test_events_of_every_choice_then_the_usage_adds_up():
    choices = Choices([stream(delta("a"), final(1), pause=0.01),
                       stream(delta("b"), delta("c"), final(2))])
    await choices.first()
    got = [(i, r.WhichOneof("kind")) for i, r in [x async for x in choices.events()]]
    await choices.close()
    assert sorted(got) == [(0, "delta"), (0, "final"), (1, "delta"), (1, "delta"), (1, "final")]
    u = usage([final(1).final, final(2).final], 2)
    assert (u.prompt_tokens, u.completion_tokens) == (5, 3)


async def test_a_refusal_of_any_choice_surfaces_before_anything_is_sent():
    refused = RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "r.1: full")
    choices = Choices([stream(delta("a"), final(1), pause=0.05), stream(fail=refused)])
    with pytest.raises(RequestFailed, match="full"):
        await choices.first()
    await choices.close()


async def test_a_bug_in_a_choice_is_an_internal_error_not_a_hang():
    choices = Choices([stream(delta("a"), fail=ValueError("boom"))])
    await choices.first()
    with pytest.raises(RequestFailed, match="boom") as err:
        await asyncio.wait_for(anext(aiter(choices.events())), 5)
        await asyncio.wait_for(anext(aiter(choices.events())), 5)
    assert err.value.status == grpc.StatusCode.INTERNAL
    await choices.close()


async def test_close_ends_choices_still_running():
    closed = []

    async def endless():
        try:
            while True:
                yield delta("x")
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    choices = Choices([endless()])
    await choices.first()
    await choices.close()
    assert closed == [True]


def test_logprobs_objects_in_both_shapes():
    token_bytes = {1: b"ab", 2: b"\xe2\x82"}.get
    chat = ChoiceLogprobs(True, token_bytes)
    part = chat.of(delta("ab", 1, -0.5).delta)
    assert part == {"content": [{"token": "ab", "logprob": -0.5, "bytes": [97, 98],
                                 "top_logprobs": [{"token": "ab", "logprob": -0.5,
                                                   "bytes": [97, 98]}]}], "refusal": None}
    assert chat.of(delta("ab", 1).delta) is None  # not asked for
    legacy = ChoiceLogprobs(False, token_bytes)
    legacy.add(delta("ab", 1, -0.5).delta)
    legacy.add(delta("", 2, -1.0).delta)
    whole = legacy.whole(True)
    assert whole["tokens"] == ["ab", "\ufffd"] and whole["text_offset"] == [0, 2]
    assert whole["token_logprobs"] == [-0.5, -1.0]
    assert ChoiceLogprobs(False, token_bytes).whole(False) is None
