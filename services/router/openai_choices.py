"""The `n` choices of one OpenAI request, generated side by side.

Each choice is a request of its own through the Gateway (its own KV, decode slot and usage
record), with the id `<id>.<i>` and, when seeded, the seed `seed + i`: choice 0 is what the
same request with n = 1 gives, and greedy choices are all the same text (as OpenAI's). Each
choice's response stream is read to its end by a task of its own (a stream's logging context
stays in the task that opened it) into one queue the handler reads.

`usage` adds the choices up as OpenAI does: the prompt once, every choice's completion tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc

from services.protos_gen.epserve.v1 import inference_pb2
from services.router.flow import RequestFailed
from services.router.validation import RawRequest

_END = object()


def choice_requests(raw: RawRequest, n: int) -> list[RawRequest]:
    if n == 1:
        return [raw]
    return [dataclasses.replace(
        raw, request_id=f"{raw.request_id}.{i}",
        seed=None if raw.seed is None else (raw.seed + i) % 2**63) for i in range(n)]


class Choices:
    def __init__(self, streams: list[AsyncIterator[inference_pb2.GenerateResponse]]) -> None:
        self.n = len(streams)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._early: deque = deque()  # read by `first`, not yet by `events`
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    @classmethod
    def start(cls, raw: RawRequest, n: int,
              generate: Callable[[RawRequest], AsyncIterator[inference_pb2.GenerateResponse]]
              ) -> Choices:
        return cls([generate(r) for r in choice_requests(raw, n)])

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
        while len(answered) < self.n:
            index, item = await self._queue.get()
            if isinstance(item, RequestFailed):
                raise item
            self._early.append((index, item))
            answered.add(index)

    async def events(self) -> AsyncIterator[tuple[int, inference_pb2.GenerateResponse]]:
        """(choice index, response) as they come; raises the first choice's RequestFailed."""
        ended = 0
        while ended < self.n:
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


def usage(finals: list[inference_pb2.GenerateFinal]) -> inference_pb2.Usage:
    first = finals[0].usage
    return inference_pb2.Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(f.usage.completion_tokens for f in finals),
        time_to_first_token_s=min(f.usage.time_to_first_token_s for f in finals),
        total_time_s=max(f.usage.total_time_s for f in finals),
        prompt_cache_hit_tokens=first.prompt_cache_hit_tokens,
        prompt_cache_miss_tokens=first.prompt_cache_miss_tokens)
