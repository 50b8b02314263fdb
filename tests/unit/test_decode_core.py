"""DecodeCore with a fake forward: reservations, KV install, the token stream, cancel, waiting."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.load import InstanceLoad
from services.decode.core import DecodeCore, Rejected
from services.engine.kv_cache import LatentKVCache
from services.engine.sampling import SamplingParams
from services.model.config import ModelConfig
from services.model.presets import PRESETS

CFG = ModelConfig.from_dict(PRESETS["tiny"])  # 3 layers, latent 40, vocab 512, eos 1
BLOCK = 4
NUM_BLOCKS = 8  # 32 tokens of KV in all


class FakeForward:
    """Greedy next token = input id + 1 (so a stream from 10 never hits eos = 1)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []  # (ids, positions)
        self.fail = fail

    async def __call__(self, ids: torch.Tensor, batch, layers) -> torch.Tensor:
        assert batch.is_decode and len(layers) == CFG.num_hidden_layers
        self.calls.append((ids.tolist(), batch.positions.tolist()))
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("expert worker 3 unreachable")
        logits = torch.zeros(len(ids), CFG.vocab_size)
        logits[torch.arange(len(ids)), (ids + 1) % CFG.vocab_size] = 5.0
        return logits


def kv(tokens: int) -> torch.Tensor:
    return torch.randn(CFG.num_hidden_layers, tokens, CFG.latent_dim)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)


async def events_until_done(slot, timeout: float = 5.0) -> list[tuple]:
    out = []
    async with asyncio.timeout(timeout):
        while True:
            event = await slot.events.get()
            out.append(event)
            if event[0] in ("finished", "error"):
                return out


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def make_core():
    cores: list[DecodeCore] = []

    def build(forward=None, num_blocks: int = NUM_BLOCKS, start: bool = True,
              **kw) -> DecodeCore:
        cache = LatentKVCache(CFG.num_hidden_layers, CFG.latent_dim, num_blocks, BLOCK)
        core = DecodeCore(CFG, forward or FakeForward(), cache, **kw)
        if start:
            core.start()
        cores.append(core)
        return core

    yield build
    for core in cores:
        await core.stop()


# -- admission ---------------------------------------------------------------------------------

async def test_admission_reserves_blocks_for_the_whole_life(make_core):
    core = make_core()
    slot = await core.admit("a", [10] * 5, greedy(3))  # 8 tokens = 2 blocks of 4
    assert slot.blocks == 2 and not slot.kv_ready and slot.request_id == "a"
    assert core.budget.holds("a") and core.budget.reserved_blocks == 2
    assert core.load() == InstanceLoad(running_requests=1, kv_blocks_in_use=2,
                                       kv_blocks_total=NUM_BLOCKS, queued_requests=0,
                                       kv_block_size=core.budget.block_size)
    assert core.cache.allocator.used_blocks == 0, "no KV is stored before the hand-over"
    core.cancel("a")


async def test_duplicate_and_draining_are_refused(make_core):
    core = make_core()
    await core.admit("a", [10], greedy(1))
    with pytest.raises(Rejected) as exc_info:
        await core.admit("a", [10], greedy(1))
    assert exc_info.value.code == "ALREADY_EXISTS"
    core.draining = True
    with pytest.raises(Rejected) as exc_info:
        await core.admit("b", [10], greedy(1))
    assert exc_info.value.code == "UNAVAILABLE"
    assert core.budget.reserved_blocks == 1
    core.cancel("a")


async def test_request_that_can_never_fit_is_resource_exhausted(make_core):
    core = make_core()
    with pytest.raises(Rejected) as exc_info:
        await core.admit("big", [10] * 30, greedy(5))  # 35 tokens = 9 blocks > 8
    assert exc_info.value.code == "RESOURCE_EXHAUSTED"
    assert "needs 9 KV blocks; this instance has 8" in exc_info.value.message
    assert core.slots == {} and core.budget.reserved_blocks == 0


async def test_request_waiting_for_room_times_out(make_core):
    core = make_core(admission_wait_s=0.05)
    await core.admit("a", [10] * 20, greedy(12))  # all 8 blocks
    with pytest.raises(Rejected) as exc_info:
        await core.admit("b", [10], greedy(1))
    assert exc_info.value.code == "RESOURCE_EXHAUSTED"
    assert "KV cache full: 1 blocks not free within 0.05s" in exc_info.value.message
    assert not core.budget.holds("b") and "b" not in core.slots
    core.cancel("a")


async def test_request_waiting_for_room_is_admitted_once_another_finishes(make_core):
    core = make_core(admission_wait_s=5.0)
    a = await core.admit("a", [10] * 20, greedy(3))  # 23 tokens = 6 blocks
    waiter = asyncio.create_task(core.admit("b", [20] * 8, greedy(4)))  # 3 blocks
    await settle()
    assert not waiter.done(), "b must wait: only 2 blocks are free"
    core.install_kv("a", kv(20), first_token=10)
    events = await events_until_done(a)
    assert events[-1] == ("finished", "length", 3)
    b = await asyncio.wait_for(waiter, 2.0)
    assert b.request_id == "b" and core.budget.holds("b") and not core.budget.holds("a")
    assert core.budget.reserved_blocks == 3
    core.install_kv("b", kv(8), first_token=20)
    assert [e[2] for e in (await events_until_done(b))[:-1]] == [20, 21, 22, 23]


async def test_cancel_while_waiting_frees_room_for_the_waiter(make_core):
    core = make_core(admission_wait_s=5.0)
    await core.admit("a", [10] * 20, greedy(12))
    waiter = asyncio.create_task(core.admit("b", [10], greedy(1)))
    await settle()
    assert not waiter.done()
    core.cancel("a")
    slot = await asyncio.wait_for(waiter, 2.0)
    assert slot.blocks == 1 and core.budget.reserved_blocks == 1
    core.cancel("b")


async def test_duplicate_of_a_request_still_waiting_is_already_exists(make_core):
    core = make_core(admission_wait_s=5.0)
    await core.admit("a", [10] * 20, greedy(12))  # all 8 blocks
    first = asyncio.create_task(core.admit("b", [10], greedy(1)))
    await settle()
    with pytest.raises(Rejected) as exc_info:
        await core.admit("b", [10], greedy(1))
    assert exc_info.value.code == "ALREADY_EXISTS"
    core.cancel("a")
    slot = await asyncio.wait_for(first, 2.0)
    assert slot.request_id == "b" and core.budget.reserved_blocks == 1
    core.cancel("b")


async def test_abandoned_wait_leaves_nothing_behind(make_core):
    core = make_core(admission_wait_s=5.0)
    await core.admit("a", [10] * 20, greedy(12))
    waiter = asyncio.create_task(core.admit("b", [10], greedy(1)))
    await settle()
    waiter.cancel()  # the client went away while waiting for room
    with pytest.raises(asyncio.CancelledError):
        await waiter
    core.cancel("a")
    await settle()
    assert core.budget.reserved_blocks == 0 and core.slots == {}
    slot = await asyncio.wait_for(core.admit("b", [10], greedy(1)), 2.0)  # id free again
    assert slot.blocks == 1
    core.cancel("b")


# -- KV install --------------------------------------------------------------------------------

async def test_install_kv_with_wrong_shape_is_invalid_argument(make_core):
    core = make_core()
    await core.admit("a", [10] * 5, greedy(3))
    for bad in (kv(4), torch.randn(2, 5, CFG.latent_dim), torch.randn(3, 5, CFG.latent_dim + 1)):
        with pytest.raises(Rejected) as exc_info:
            core.install_kv("a", bad, first_token=10)
        assert exc_info.value.code == "INVALID_ARGUMENT"
    assert exc_info.value.message == "KV of shape [3, 5, 41], expected [3, 5, 40]"
    assert core.cache.allocator.used_blocks == 0, "nothing is installed from a bad hand-over"
    assert not core.slots["a"].kv_ready
    core.cancel("a")


@pytest.mark.parametrize("first_token", [-1, CFG.vocab_size])
async def test_install_kv_with_first_token_outside_vocab(make_core, first_token):
    core = make_core()
    await core.admit("a", [10] * 5, greedy(3))
    with pytest.raises(Rejected) as exc_info:
        core.install_kv("a", kv(5), first_token=first_token)
    assert exc_info.value.code == "INVALID_ARGUMENT"
    assert f"first token {first_token} outside the vocab" == exc_info.value.message
    core.cancel("a")


async def test_install_kv_without_reservation_or_twice(make_core):
    core = make_core(start=False)
    with pytest.raises(Rejected) as exc_info:
        core.install_kv("ghost", kv(1), first_token=10)
    assert exc_info.value.code == "NOT_FOUND"
    await core.admit("a", [10] * 5, greedy(3))
    core.install_kv("a", kv(5), first_token=10)
    with pytest.raises(Rejected) as exc_info:
        core.install_kv("a", kv(5), first_token=10)
    # ALREADY_EXISTS, not an error of the request: a prefill re-driven after its transfer did
    # arrive finds the KV installed, and the router then carries on with the decode stream.
    assert exc_info.value.code == "ALREADY_EXISTS"
    core.cancel("a")


async def test_installed_kv_lands_in_the_cache(make_core):
    core = make_core(start=False)
    await core.admit("a", [10] * 5, greedy(3))
    latent = kv(5)
    core.install_kv("a", latent, first_token=10)
    assert torch.equal(core.cache.read("a", 5), latent)
    core.cancel("a")


# -- the token stream --------------------------------------------------------------------------

async def test_tokens_stream_in_order_then_finish_with_length(make_core):
    forward = FakeForward()
    core = make_core(forward)
    slot = await core.admit("a", [7] * 5, greedy(4))
    core.install_kv("a", kv(5), first_token=10)
    events = await events_until_done(slot)
    assert events == [("token", 0, 10), ("token", 1, 11), ("token", 2, 12), ("token", 3, 13),
                      ("finished", "length", 4)]
    # Each step feeds the newest token at the next position (prompt 5 -> positions 5, 6, 7).
    assert forward.calls == [([10], [5]), ([11], [6]), ([12], [7])]
    await settle()
    assert core.slots == {} and core.budget.reserved_blocks == 0
    assert core.cache.allocator.used_blocks == 0, "finished requests free their KV"
    assert core.running() == []


async def test_single_token_request_finishes_on_install(make_core):
    forward = FakeForward()
    core = make_core(forward)
    slot = await core.admit("a", [7] * 3, greedy(1))
    core.install_kv("a", kv(3), first_token=10)
    assert await events_until_done(slot) == [("token", 0, 10), ("finished", "length", 1)]
    await settle()
    assert forward.calls == [] and core.budget.reserved_blocks == 0


async def test_eos_finishes_with_stop(make_core):
    core = make_core()
    slot = await core.admit("a", [7] * 3, greedy(10))
    core.install_kv("a", kv(3), first_token=CFG.vocab_size - 1)  # next: (511 + 1) % 512 = 0
    events = await events_until_done(slot)
    assert events == [("token", 0, 511), ("token", 1, 0), ("token", 2, 1),
                      ("finished", "stop", 3)]


async def test_context_limit_finishes_with_length(make_core):
    core = make_core(num_blocks=(CFG.max_position_embeddings // BLOCK))
    prompt = CFG.max_position_embeddings - 2
    slot = await core.admit("a", [7] * prompt, greedy(100))
    assert slot.blocks == CFG.max_position_embeddings // BLOCK, "capped by the context"
    core.install_kv("a", kv(prompt), first_token=10)
    events = await events_until_done(slot)
    assert events[-1] == ("finished", "length", 2)


async def test_two_requests_are_batched_and_keep_their_own_streams(make_core):
    forward = FakeForward()
    core = make_core(forward)
    a = await core.admit("a", [7] * 2, greedy(3))
    b = await core.admit("b", [7] * 4, greedy(3))
    core.install_kv("a", kv(2), first_token=100)
    core.install_kv("b", kv(4), first_token=200)
    ea, eb = await events_until_done(a), await events_until_done(b)
    assert ea == [("token", 0, 100), ("token", 1, 101), ("token", 2, 102),
                  ("finished", "length", 3)]
    assert eb == [("token", 0, 200), ("token", 1, 201), ("token", 2, 202),
                  ("finished", "length", 3)]
    assert ([100, 200], [2, 4]) in forward.calls


async def test_cancel_frees_the_reservation_and_the_kv(make_core):
    core = make_core(start=False)
    slot = await core.admit("a", [7] * 5, greedy(20))
    core.install_kv("a", kv(5), first_token=10)
    assert core.cache.allocator.used_blocks == 2 and core.budget.reserved_blocks == 7
    core.cancel("a")
    assert slot.seq.finish_reason == "abort"
    assert core.slots == {} and core.budget.reserved_blocks == 0
    assert core.cache.allocator.used_blocks == 0
    core.cancel("a")  # again, and unknown ids: no effect
    core.cancel("nope")
    await core.admit("a", [7] * 5, greedy(20))  # the id and the room can be used again
    core.cancel("a")


async def test_cancel_mid_stream_stops_the_tokens(make_core):
    core = make_core()
    slot = await core.admit("a", [7] * 5, greedy(20))
    core.install_kv("a", kv(5), first_token=10)
    await slot.events.get()
    core.cancel("a")
    await settle()
    received = []
    while not slot.events.empty():
        received.append(slot.events.get_nowait())
    assert all(e[0] == "token" for e in received) and len(received) < 19
    assert core.slots == {} and core.budget.reserved_blocks == 0


async def test_failed_step_fails_its_requests_and_frees_them(make_core):
    core = make_core(FakeForward(fail=True))
    slot = await core.admit("a", [7] * 5, greedy(5))
    core.install_kv("a", kv(5), first_token=10)
    events = await events_until_done(slot)
    assert events == [("token", 0, 10), ("error", "INTERNAL", "expert worker 3 unreachable")]
    await settle()
    assert core.slots == {} and core.budget.reserved_blocks == 0


async def test_finish_in_flight_drains(make_core):
    core = make_core()
    slot = await core.admit("a", [7] * 5, greedy(3))
    core.install_kv("a", kv(5), first_token=10)
    await asyncio.wait_for(core.finish_in_flight(poll_s=0.001), 2.0)
    assert core.draining and core.slots == {}
    assert (await events_until_done(slot))[-1] == ("finished", "length", 3)


async def test_a_sequence_cancelled_mid_step_keeps_its_blocks_until_the_step_is_over(make_core):
    """The step writes the cancelled sequence's new KV into its blocks after the cancel: they
    must not have been handed to a request installed meanwhile (found by the chaos suite)."""
    entered, release = asyncio.Event(), asyncio.Event()

    class SlowForward(FakeForward):
        async def __call__(self, ids, batch, layers):
            entered.set()
            await release.wait()
            # the step's cache write, as attention does it: into the slots it was given
            for layer in layers:
                layer.index_fill_(0, batch.write_slots, 99.0)
            return await super().__call__(ids, batch, layers)

    # exactly as many blocks as the two requests need: b can only get a's blocks back
    core = make_core(SlowForward(), num_blocks=2)
    a = await core.admit("a", [10] * 3, greedy(4))  # 7 tokens: 2 blocks
    core.install_kv("a", kv(3), first_token=10)
    await asyncio.wait_for(entered.wait(), 2.0)
    core.cancel("a")  # mid-step
    admit_b = asyncio.create_task(core.admit("b", [11] * 3, greedy(4)))
    await settle()
    assert not admit_b.done(), "a's reservation is held while its step runs"
    release.set()
    await asyncio.wait_for(admit_b, 2.0)
    latent = kv(3)
    core.install_kv("b", latent, first_token=11)
    got = core.cache.read("b", 3)
    assert torch.equal(got.cpu(), latent), "b's KV is its own"
    assert a.seq.finish_reason == "abort"
    core.cancel("b")


# -- speculative decoding ------------------------------------------------------------------------

class FakeForwardTokens(FakeForward):
    """Every token's logits (next = id + 1) and a zero hidden state: a verification step."""

    async def __call__(self, ids, batch, layers):
        assert batch.speculative and len(layers) == CFG.num_hidden_layers
        self.calls.append((ids.tolist(), batch.positions.tolist()))
        await asyncio.sleep(0)
        logits = torch.zeros(len(ids), CFG.vocab_size)
        logits[torch.arange(len(ids)), (ids + 1) % CFG.vocab_size] = 5.0
        return logits, torch.zeros(len(ids), 8)


class NextNextDrafter:
    """Drafts the right token (the fake model's id + 2), except for request "w"."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def propose(self, inputs):
        return [(i.tokens[-1] + (5 if i.seq.request_id == "w" else 1)) % CFG.vocab_size
                for i in inputs]

    def forget(self, seq_id):
        self.forgotten.append(seq_id)


async def test_speculative_steps_stream_the_same_tokens_in_fewer_steps(make_core):
    from services.engine.speculative import Speculation

    verify, drafter = FakeForwardTokens(), NextNextDrafter()
    core = make_core(FakeForward(), speculation=Speculation(drafter), forward_tokens=verify)
    a = await core.admit("a", [7] * 5, greedy(8))  # 13 tokens: 4 blocks of 4
    w = await core.admit("w", [7] * 2, greedy(8))  # its drafts are always wrong
    core.install_kv("a", kv(5), first_token=10)
    core.install_kv("w", kv(2), first_token=50)
    ea, ew = await events_until_done(a), await events_until_done(w)
    assert ea == [("token", i, 10 + i) for i in range(8)] + [("finished", "length", 8)]
    assert ew == [("token", i, 50 + i) for i in range(8)] + [("finished", "length", 8)]
    fed_a = [(ids, pos) for ids, pos in verify.calls if 10 <= ids[0] < 50]
    # a: positions 5 (no draft yet), then token + draft two at a time, the last alone
    assert [pos[0] for _, pos in fed_a][:3] == [5, 6, 8]
    assert core.speculation.stats.accepted[0] >= 3
    async with asyncio.timeout(5):  # the step's draft, after the last token, ends first
        while core.cache.allocator.used_blocks:
            await asyncio.sleep(0.01)
    assert {"a", "w"} <= set(drafter.forgotten) and core.speculation._drafts == {}
    assert core.cache.allocator.used_blocks == 0 and core.budget.reserved_blocks == 0
