"""The choices of one OpenAI request, generated side by side: `n` for each of its prompts (a
completions body may hold a batch of prompts; chat has one).

Prompt p's choice c has OpenAI's (and vLLM's) index i = p * n + c. Each choice is a request of
its own through the Gateway (its own KV, decode slot, admission and API-key slot, usage
record), with the id `<id>.<i>` (the bare id when there is one choice in all) and, when
seeded, the seed `seed + c`: each prompt's choices are what that prompt alone with the same
n gives, its choice 0 what it gives with n = 1, and greedy choices are all the same text (as
OpenAI's). Each choice's response stream is read to its end by a task of its own (a stream's
logging context stays in the task that opened it) into one queue the handler reads.

`usage` adds the choices up as OpenAI does: every prompt once, every choice's completion
tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from services.protos_gen.epserve.v1 import inference_pb2
from services.router.flow import RequestFailed
from services.router.validation import RawRequest

_END = object()


def choice_requests(prompts: Sequence[RawRequest], n: int) -> list[RawRequest]:
    """One request per (prompt, choice), in choice-index order."""
    if len(prompts) * n == 1:
        return [prompts[0]]
    return [dataclasses.replace(
        raw, request_id=f"{raw.request_id}.{p * n + c}",
        seed=None if raw.seed is None else (raw.seed + c) % 2**63)
        for p, raw in enumerate(prompts) for c in range(n)]


class Choices:
    def __init__(self, streams: list[AsyncIterator[inference_pb2.GenerateResponse]]) -> None:
        self.count = len(streams)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._early: deque = deque()  # read by `first`, not yet by `events`
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    @classmethod
    def start(cls, prompts: Sequence[RawRequest], n: int,
              generate: Callable[[RawRequest], AsyncIterator[inference_pb2.GenerateResponse]]
              ) -> Choices:
        return cls([generate(r) for r in choice_requests(prompts, n)])

    async def _pump(self, index: int, stream) -> None:
        try:
            async for response in stream:
                self._queue.put_nowait((index, response))
        except RequestFailed as exc:
            self._queue.put_nowait((index, exc))
        except Exception as exc:  # a bug: the handler still gets an answer, not a hang
            self._queue.put_nowait((index, RequestFailed(
                grpc.StatusCode.INTERNAL, f"choice {index}: internal error: {exc}")))
        finally:
            await stream.aclose()  # the request's clean-up (slot, usage record) runs now
        self._queue.put_nowait((index, _END))

    async def first(self) -> None:
        """Wait until every choice has answered once; a refusal of any raises RequestFailed
        here, before a byte of the response is sent."""
        answered: set[int] = set()
        while len(answered) < self.count:
            index, item = await self._queue.get()
            if isinstance(item, RequestFailed):
                raise item
            self._early.append((index, item))
            answered.add(index)

    async def events(self) -> AsyncIterator[tuple[int, inference_pb2.GenerateResponse]]:
        """(choice index, response) as they come; raises the first choice's RequestFailed."""
        ended = 0
        while ended < self.count:
            index, item = self._early.popleft() if self._early else await self._queue.get()
            if item is _END:
                ended += 1
            elif isinstance(item, RequestFailed):
                raise item
            else:
                yield index, item

    async def close(self) -> None:
        """Ends every choice still running (a client that left, a failed sibling)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def usage(finals: Sequence[inference_pb2.GenerateFinal], n: int) -> inference_pb2.Usage:
    """`finals` in choice-index order, `n` choices per prompt: each prompt's tokens (and its
    cache hits and misses) are counted once, from its first choice."""
    firsts = [f.usage for f in finals[::n]]
    return inference_pb2.Usage(
        prompt_tokens=sum(u.prompt_tokens for u in firsts),
        completion_tokens=sum(f.usage.completion_tokens for f in finals),
        time_to_first_token_s=min(f.usage.time_to_first_token_s for f in finals),
        total_time_s=max(f.usage.total_time_s for f in finals),
        prompt_cache_hit_tokens=sum(u.prompt_cache_hit_tokens for u in firsts),
        prompt_cache_miss_tokens=sum(u.prompt_cache_miss_tokens for u in firsts))
