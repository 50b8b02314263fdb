"""n choices side by side (router/openai_choices.py) and their logprobs objects."""

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


def final(tokens: int, prompt: int = 5):
    return inference_pb2.GenerateResponse(final=inference_pb2.GenerateFinal(
        finish_reason="length", usage=inference_pb2.Usage(prompt_tokens=prompt,
                                                          completion_tokens=tokens)))


async def stream(*items, fail: Exception | None = None, pause: float = 0.0):
    for item in items:
        await asyncio.sleep(pause)
        yield item
    if fail is not None:
        raise fail


def test_choice_i_gets_its_own_id_and_seed_plus_i():
    raw = RawRequest("r", prompt="x", max_tokens=3, temperature=1.0, seed=7)
    assert choice_requests(raw, 1) == [raw]
    three = choice_requests(raw, 3)
    assert [r.request_id for r in three] == ["r.0", "r.1", "r.2"]
    assert [r.seed for r in three] == [7, 8, 9]
    assert choice_requests(RawRequest("r", seed=None), 2)[1].seed is None


async def test_events_of_every_choice_then_the_usage_adds_up():
    choices = Choices([stream(delta("a"), final(1), pause=0.01),
                       stream(delta("b"), delta("c"), final(2))])
    await choices.first()
    got = [(i, r.WhichOneof("kind")) for i, r in [x async for x in choices.events()]]
    await choices.close()
    assert sorted(got) == [(0, "delta"), (0, "final"), (1, "delta"), (1, "delta"), (1, "final")]
    u = usage([final(1).final, final(2).final])
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
