"""When compute skips the compute thread: keyed, measured short, and nothing else on the thread."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from services.engine.compute_thread import ComputeThread


def _where() -> str:
    return threading.current_thread().name


async def test_unkeyed_work_always_runs_on_the_thread():
    ct = ComputeThread()
    for _ in range(3):
        assert (await ct.call(_where)).startswith("compute")
    assert ct.inline_runs == 0 and ct.thread_runs == 3


async def test_a_key_is_measured_on_the_thread_then_runs_inline():
    ct = ComputeThread(inline_max_s=0.5)
    places = [(await ct.run(_where, inline_key="k"))[2] for _ in range(3)]
    assert places[0].startswith("compute")
    assert places[1:] == [threading.current_thread().name] * 2
    assert ct.inline_runs == 2


async def test_a_slow_run_sends_its_key_back_to_the_thread():
    ct = ComputeThread(inline_max_s=0.01)

    def work(sleep_s: float) -> str:
        time.sleep(sleep_s)
        return _where()

    assert (await ct.run(work, 0.0, inline_key="k"))[2].startswith("compute")
    assert not (await ct.run(work, 0.03, inline_key="k"))[2].startswith("compute")  # inline, slow
    assert (await ct.run(work, 0.0, inline_key="k"))[2].startswith("compute")  # so: the thread
    assert not ct.may_inline("other")  # an unmeasured key never starts inline


async def test_no_inline_run_while_the_thread_has_work():
    """Inline work must not run beside the thread's: the ops' order would be lost."""
    ct = ComputeThread(inline_max_s=0.5)
    await ct.run(_where, inline_key="k")  # measured: short
    release = threading.Event()
    busy = asyncio.ensure_future(ct.call(release.wait, 5))
    await asyncio.sleep(0.05)
    assert ct.in_flight == 1 and not ct.may_inline("k")
    queued = asyncio.ensure_future(ct.run(_where, inline_key="k"))
    await asyncio.sleep(0.05)
    assert not queued.done()  # it went to the thread, behind the busy work
    release.set()
    assert (await asyncio.wait_for(queued, 5))[2].startswith("compute")
    assert await busy is True
    assert ct.in_flight == 0 and ct.may_inline("k")


async def test_start_times_are_returned_in_order():
    ct = ComputeThread()
    t0, t1, out = await ct.run(lambda: 7)
    assert out == 7 and t0 <= t1


async def test_the_thread_runs_with_the_callers_torch_thread_count():
    """A matmul's float sums depend on the intra-op thread count, which is per thread: work
    must give the same bits inline and on the thread, even after the caller changed it."""
    ct = ComputeThread()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert await ct.call(torch.get_num_threads) == 1
        torch.set_num_threads(2)
        assert await ct.call(torch.get_num_threads) == 2
        torch.set_num_threads(1)
        assert await ct.call(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(before)
