"""Prompt tokenising off the router's event loop: a few worker threads, a bound on the prompts
waiting for them, and an encode that lets go of the GIL.

Why not just `asyncio.to_thread(tokenizer.encode, ...)`: `tokenizers.Tokenizer.encode` holds
the GIL for the whole call (measured here: a 1 MB prompt encoded on a thread still stalled
the event loop 1.5 s, every other stream's tokens with it), while `encode_batch` releases it
while it works. So this pool encodes through `encode_batch` of one text, on a backend loaded
from the same tokenizer.json, with the run-time tokenizer's BOS rule (ids equal
`Tokenizer.encode`'s: tests check it); chat templates render on the thread too (pure Python,
which gives the GIL back every switch interval).

At most `max_pending` prompts are tokenising or waiting to; one more is `EncoderBusy`
(RESOURCE_EXHAUSTED / HTTP 429), so work before admission stays bounded as admission is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import tokenizers

from services.model.tokenizer import TOKENIZER_FILE, Tokenizer
from services.router import metrics

T = TypeVar("T")


class EncoderBusy(Exception):
    """Too many prompts are being tokenised already."""


class EncoderPool:
    def __init__(self, tokenizer: Tokenizer, backend: tokenizers.Tokenizer, threads: int,
                 max_pending: int) -> None:
        if threads < 1 or max_pending < 1:
            raise ValueError(f"need threads >= 1 and max_pending >= 1, got {threads}, "
                             f"{max_pending}")
        self.tokenizer, self._backend = tokenizer, backend
        self.max_pending = max_pending
        self.pending = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")

    @classmethod
    def from_dir(cls, model_dir: str | Path, tokenizer: Tokenizer, threads: int,
                 max_pending: int) -> EncoderPool:
        backend = tokenizers.Tokenizer.from_file(str(Path(model_dir) / TOKENIZER_FILE))
        return cls(tokenizer, backend, threads, max_pending)

    # ---- a PromptEncoder (services/router/validation.py), to be called on the pool ----------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        return [self.tokenizer.bos_id, *ids] if add_bos else ids

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template writes BOS itself (as Tokenizer.apply_chat_template).
        return self.encode(self.tokenizer.render_chat(messages), add_bos=False)

    # ---- the pool -------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread; EncoderBusy at once when `max_pending` are
        tokenising or waiting already. A caller cancelled before its turn takes its work off
        the queue; one cancelled later leaves it to finish, still counted until it has."""
        if self.pending >= self.max_pending:
            raise EncoderBusy(f"{self.pending} prompts are being tokenised already, the most "
                              f"this router takes at once")
        loop = asyncio.get_running_loop()
        work = self._pool.submit(functools.partial(fn, *args))
        self._count(+1)
        work.add_done_callback(functools.partial(self._finished, loop))
        return await asyncio.wrap_future(work)

    def _finished(self, loop: asyncio.AbstractEventLoop, _work) -> None:  # on the thread
        with contextlib.suppress(RuntimeError):  # the loop closed first (the router stopped)
            loop.call_soon_threadsafe(self._count, -1)

    def _count(self, change: int) -> None:
        self.pending += change
        metrics.PROMPTS_ENCODING.set(self.pending)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most bytes one token stands for (special tokens' text included): a text of N bytes
    is at least N / this many tokens."""
    return max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
