"""One MoE layer's dispatch in flight: its requests are on the workers' streams; result()
waits for the replies (with a deadline), decodes them and adds them in worker order (fp32), so
the result does not depend on which reply arrives first. The halves' times are kept for traces.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Histogram

from services.engine.tensor_proto import from_proto
from services.engine.wire import decode
from services.engine.worker_stream import EPError, WorkerTiming

# Where a dispatch's time goes, seen from the attention side (bench/bench_cluster.py splits
# an instance's step time with these). Process-wide: one attention instance per process.
DISPATCH_SECONDS = Histogram(
    "epserve_ep_dispatch_seconds", "one MoE layer's dispatch(), attention side, wall time",
    buckets=(1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.5))
SERIALIZE_SECONDS = Counter(
    "epserve_ep_serialize_seconds",
    "dispatch() time spent on tensor<->proto: encoding requests, decoding and adding replies")
WORKER_COMPUTE_SECONDS = Counter(
    "epserve_ep_worker_compute_seconds",
    "per dispatch, the slowest worker's reported compute time (the critical path)")


@dataclass
class PendingDispatch:
    """A dispatch whose requests are on the streams; result() waits for and combines the
    replies. Timestamps are time.perf_counter() seconds in this process."""

    client: object  # the ExpertClient (timeout_s, and abandon() when it has it)
    step_id: int
    layer_id: int
    x: torch.Tensor
    shares: list
    futures: list[asyncio.Future]
    workers: list[WorkerTiming]
    t_start: float  # start_dispatch() began: routing, encoding, writes
    t_written: float  # start_dispatch() returned: every write() completed
    serialize_s: float  # encoding time
    t_combine: float | None = None  # every reply in: decoding and adding began
    t_done: float | None = None  # the combined output is ready
    deadline_s: float | None = None  # how long result() waits (None: client.timeout_s)
    arrived_s: float | None = None  # start to the last reply
    _out: torch.Tensor | None = field(default=None, repr=False)

    async def result(self) -> torch.Tensor:
        """The routed output [T, H] fp32 (on x's device); EPError on a failed, rejecting or
        silent worker (DEADLINE_EXCEEDED after `deadline_s`, default the client's timeout:
        the workers that missed it are named in `ranks` and told to the client's `abandon`)."""
        if self._out is not None:
            return self._out
        client, layer_id = self.client, self.layer_id
        wait_s = self.deadline_s if self.deadline_s is not None else client.timeout_s
        late_futures = set()
        if self.futures:
            _, late_futures = await asyncio.wait(self.futures, timeout=wait_s,
                                                 return_when=asyncio.FIRST_EXCEPTION)
        failed = [f.exception() for f in self.futures if f.done() and f.exception() is not None]
        if failed:  # a stream broke under the wait: the others' replies are not needed
            for f in late_futures:
                f.cancel()
            raise failed[0]
        if late_futures:
            late = tuple(s.worker for s, f in zip(self.shares, self.futures, strict=True)
                         if f in late_futures)
            for f in late_futures:
                f.cancel()
            abandon = getattr(client, "abandon", None)
            if abandon is not None:
                abandon(late, f"no reply within {wait_s:.2f}s")
            self._retrieve_failures()
            raise EPError(f"no reply from expert workers {list(late)} within {wait_s:.2f}s "
                          f"(layer {layer_id}, step {self.step_id})", "DEADLINE_EXCEEDED",
                          ranks=late)
        arrived = [f.result() for f in self.futures]
        self.arrived_s = time.perf_counter() - self.t_start
        deadlines = getattr(client, "deadlines", None)
        if deadlines is not None:
            deadlines.observe(self.x.shape[0], self.arrived_s)
        t_decode = time.perf_counter()
        x = self.x
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        replies = []
        for share, timing, (reply, t_reply) in zip(self.shares, self.workers, arrived,
                                                   strict=True):
            timing.reply, timing.compute_s = t_reply, reply.compute_seconds
            replies.append(reply)
            if reply.HasField("error"):
                raise EPError(f"expert worker {share.worker} rejected layer {layer_id}: "
                              f"{reply.error.code} {reply.error.message}", reply.error.code,
                              share.worker)
            out[share.rows] += decode(from_proto(reply.combined), torch.float32)
        done = time.perf_counter()
        self.t_combine, self.t_done = t_decode, done
        SERIALIZE_SECONDS.inc(self.serialize_s + done - t_decode)
        WORKER_COMPUTE_SECONDS.inc(max((r.compute_seconds for r in replies), default=0.0))
        DISPATCH_SECONDS.observe(done - self.t_start)
        self._out = out.to(x.device)
        return self._out

    def _retrieve_failures(self) -> None:
        for f in self.futures:  # so that no failure is reported as "never retrieved"
            if f.done() and not f.cancelled():
                f.exception()

    @property
    def t_sent(self) -> float:
        """Every request was out by then (each worker's sent_by, at the latest)."""
        return max((w.sent_by for w in self.workers), default=self.t_written)

    @property
    def last_worker(self) -> WorkerTiming | None:
        """The worker whose reply came last, the one the combine waited for (None before
        result(), or with no shares). Its reply is at or after t_sent."""
        done = [w for w in self.workers if w.reply is not None]
        return max(done, key=lambda w: w.reply) if done else None
