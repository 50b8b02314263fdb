"""The process's one compute thread, and when a piece of compute skips it.

Every torch op of a step runs on one thread so ops keep their submission order and the event
loop stays free to move gRPC traffic while compute runs; with two micro-batches that freedom is
the overlap. With one micro-batch nothing else of the step can move while it computes, and the
hand-over itself costs two wake-ups, each a wait for a core when the cores are shared (measured
on 2 cores, `bench_cluster` at concurrency 1: the decode step's hand-off time outside dispatches
fell from 2.8 s to 0.5 s over 368 steps). So a caller may name an `inline_key`: the work then
runs on the event loop itself, provided

- nothing is on the compute thread (the loop is blocked while it runs, so nothing new can be
  submitted meanwhile: ops stay ordered), and
- the last run under the same key took at most INLINE_MAX_S, so the event loop (heartbeats,
  token streams, dispatch replies of other requests) is never held for long. A key not yet
  measured runs on the thread first.

Pure bookkeeping apart from the thread; callers give keys such as (phase, size bucket).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

INLINE_MAX_S = 0.02  # longest the event loop may be held by one inline piece of compute


def _timed(fn: Callable, args: tuple, threads: int | None = None) -> tuple[float, float, Any]:
    # torch's intra-op thread count is per thread (OpenMP's), and a matmul's blocking, so its
    # float sums, depend on it: the compute thread runs with the submitting event loop's count,
    # so a piece of compute gives the same bits inline or on the thread whatever set_num_threads
    # calls came after the thread started
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = fn(*args)
        return t0, time.perf_counter(), out


class ComputeThread:
    def __init__(self, inline_max_s: float = INLINE_MAX_S) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.inline_max_s = inline_max_s
        self.in_flight = 0  # submitted through run() and not finished (event-loop side)
        self.last_s: dict[Hashable, float] = {}
        self.inline_runs = self.thread_runs = 0

    def may_inline(self, key: Hashable | None) -> bool:
        return (key is not None and self.in_flight == 0
                and self.last_s.get(key, float("inf")) <= self.inline_max_s)

    async def run(self, fn: Callable, *args, inline_key: Hashable | None = None
                  ) -> tuple[float, float, Any]:
        """(t0, t1, fn(*args)) under inference mode, on the event loop when `inline_key`
        allows (see the module docstring), else on the compute thread."""
        if self.may_inline(inline_key):
            self.inline_runs += 1
            t0, t1, out = _timed(fn, args)
        else:
            self.thread_runs += 1
            self.in_flight += 1
            try:
                t0, t1, out = await asyncio.get_running_loop().run_in_executor(
                    self.pool, _timed, fn, args, torch.get_num_threads())
            finally:
                self.in_flight -= 1
        if inline_key is not None:
            self.last_s[inline_key] = t1 - t0
        return t0, t1, out

    async def call(self, fn: Callable, *args) -> Any:
        """fn(*args) on the compute thread (never inline)."""
        return (await self.run(fn, *args))[2]


_instance: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """The process's one compute thread (shared by every engine in the process)."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = ComputeThread()
        return _instance
