"""The router's prompt tokenising off the event loop (services/router/encoder_pool.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.model.checkpoint_gen import make_model
from services.model.tokenizer import Tokenizer
from services.router.encoder_pool import EncoderBusy, EncoderPool, longest_token_bytes

TEXTS = ["hello world", "", "  leading spaces and\ttabs\n", "naïve café ☕ 中文 😀",
         "<｜begin▁of▁sentence｜> special tokens in text", "x" * 3000]


async def until(predicate, timeout_s: float = 5.0) -> None:
    """Let the loop run until `predicate()` holds; AssertionError past the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny-enc"), seed=0)


@pytest.fixture
def pool(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    p = EncoderPool.from_dir(model_dir, tok, threads=2, max_pending=2)
    yield p
    p.close()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_the_run_time_tokenizers(pool, text):
    tok = pool.tokenizer
    assert pool.encode(text) == tok.encode(text)
    assert pool.encode(text, add_bos=False) == tok.encode(text, add_bos=False)


def test_chat_template_ids_equal_the_run_time_tokenizers(pool):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": TEXTS[3]}]
    assert pool.apply_chat_template(msgs) == pool.tokenizer.apply_chat_template(msgs)


def test_longest_token_bounds_every_tokens_bytes(pool):
    tok = pool.tokenizer
    longest = longest_token_bytes(tok)
    assert longest == max(len(tok.token_bytes(i)) for i in range(tok.vocab_size)) > 1
    for text in TEXTS:  # a text of N bytes is at least N / longest tokens
        assert len(tok.encode(text, add_bos=False)) * longest >= len(text.encode())


async def test_more_than_max_pending_is_refused_and_the_count_comes_back(pool):
    release = threading.Event()
    blocked = [asyncio.ensure_future(pool.run(release.wait, 30)) for _ in range(2)]
    await asyncio.sleep(0)
    assert pool.pending == 2
    with pytest.raises(EncoderBusy):
        await pool.run(pool.encode, "x")
    release.set()
    assert await asyncio.gather(*blocked) == [True, True]
    await until(lambda: pool.pending == 0)  # the count is handed back on the loop
    assert await pool.run(pool.encode, "hi") == pool.tokenizer.encode("hi")


async def test_work_cancelled_before_its_turn_leaves_the_queue(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    one = EncoderPool.from_dir(model_dir, tok, threads=1, max_pending=4)
    release = threading.Event()
    try:
        running = asyncio.ensure_future(one.run(release.wait, 30))
        waiting = asyncio.ensure_future(one.run(one.encode, "never"))
        await asyncio.sleep(0)
        assert one.pending == 2
        waiting.cancel()
        await until(lambda: one.pending == 1)  # taken off the queue, not left counted
        assert not running.done()
        release.set()
        assert await running is True
    finally:
        release.set()
        one.close()


async def test_the_event_loop_runs_while_a_long_prompt_is_encoded(pool):
    """tokenizers' plain `encode` holds the GIL, and so the loop, for the whole call: the loop
    would wake from a short sleep begun with the encode only once the encode is over. Here it
    wakes early in it (compared with the encode's own length, not with a fixed time)."""
    text = " ".join(["serving", "experts", "tokens", "latency"] * 30_000)  # ~1 MB
    stamps: dict[str, float] = {}
    started = threading.Event()

    def encode() -> int:
        stamps["start"] = time.monotonic()
        started.set()
        n = len(pool.encode(text))
        stamps["end"] = time.monotonic()
        return n

    work = asyncio.ensure_future(pool.run(encode))
    while not started.is_set():
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    woke = time.monotonic()
    assert await work > 30_000
    took = stamps["end"] - stamps["start"]
    assert woke - stamps["start"] < took / 2, (woke - stamps["start"], took)
