"""One expert worker's long-lived Dispatch stream, seen from an attention instance.

Replies on a stream come in request order, so the stream keeps a FIFO of futures. A stream
that fails (the worker died, the connection broke) or is abandoned (the worker missed a
deadline) fails every pending future with an EPError and stays failed until `reopen()`: the
channel itself reconnects on its own, so a worker restarted on the same endpoint is reached
again by a new call on it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from services.common.channels import dial
from services.common.errors import StatusError
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc

WIRE_BYTES = Counter("epserve_ep_bytes", "dispatch message bytes (protobuf ByteSize)",
                     ["direction"])
_SENT, _RECEIVED = WIRE_BYTES.labels(direction="sent"), WIRE_BYTES.labels(direction="received")


class EPError(StatusError):
    """An expert worker failed, timed out or rejected a dispatch (`rank`: which, when known;
    `ranks`: every worker that missed a deadline; `no_live_replica`: the placement has no copy
    of a needed expert on a live worker)."""

    def __init__(self, message: str, code: str = "UNAVAILABLE", rank: int | None = None,
                 ranks: tuple[int, ...] = (), no_live_replica: bool = False) -> None:
        super().__init__(code, message)
        self.rank, self.ranks, self.no_live_replica = rank, ranks, no_live_replica

    @property
    def worker_failed(self) -> bool:
        """A worker died, stalled or is unreachable: the step can be redone around it."""
        return self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


@dataclass
class WorkerTiming:
    """One worker's share of a dispatch. send_start/sent/reply are time.perf_counter() on the
    attention side; compute_s is what the worker measured on its own clock (never compared with
    this process's timestamps, only subtracted from its reply's arrival)."""

    worker: int
    send_start: float = 0.0  # writing the request began
    sent: float = 0.0  # write() returned (gRPC may report it after the reply is in)
    reply: float | None = None  # its reply came off the stream
    compute_s: float = 0.0  # DispatchResponse.compute_seconds

    @property
    def sent_by(self) -> float:
        """When the request was out at the latest: gRPC's write completion and the reply's
        arrival come from the same poller, in either order, and a reply proves its request
        was sent."""
        return self.sent if self.reply is None else min(self.sent, self.reply)


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class WorkerStream:
    def __init__(self, rank: int, target: str) -> None:
        self.rank, self.target = rank, target
        self.channel = dial(target, "expert-worker")  # mTLS when this process has an identity
        self.stub = expert_pb2_grpc.ExpertWorkerStub(self.channel)
        self.call = None
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.write_lock = asyncio.Lock()
        self.broken: EPError | None = None
        self.reader: asyncio.Task | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def open(self) -> None:
        self.broken = None
        self.call = self.stub.Dispatch()
        self.reader = asyncio.create_task(self._read(self.call))

    async def reopen(self) -> None:
        """A fresh call on the same channel (after the worker came back)."""
        await self._stop_call()
        self.open()

    async def _read(self, call) -> None:
        try:
            async for reply in call:
                size = reply.ByteSize()
                self.bytes_received += size
                _RECEIVED.inc(size)
                if self.pending:
                    fut = self.pending.popleft()
                    if not fut.done():
                        fut.set_result((reply, time.perf_counter()))
            self.fail(EPError(f"expert worker {self.rank} ({self.target}) closed its stream",
                              rank=self.rank))
        except grpc.aio.AioRpcError as exc:
            # Whatever its code (INTERNAL when the worker's server stops under the stream),
            # a broken stream means the worker went away: UNAVAILABLE, routed around.
            # Rejections of one dispatch come in-band instead (DispatchResponse.error).
            self.fail(EPError(f"expert worker {self.rank} ({self.target}) failed: "
                              f"{exc.code().name} {exc.details()}", "UNAVAILABLE", self.rank))
        except asyncio.CancelledError:
            self.fail(EPError("dispatch stream closed", rank=self.rank))
            raise

    def fail(self, err: EPError) -> None:
        """Fail every pending reply; the stream stays broken until reopen()."""
        self.broken = self.broken or err
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    async def send(self, req: expert_pb2.DispatchRequest, timing: WorkerTiming) -> asyncio.Future:
        """Write `req`; the future resolves to (reply, perf_counter at its arrival)."""
        timing.send_start = time.perf_counter()
        if self.broken:
            raise self.broken
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)  # a reply nobody waits for any more must not warn
        async with self.write_lock:
            self.pending.append(fut)
            try:
                await self.call.write(req)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                # The stream died under the write: the worker went away, whatever the code
                # (INTERNAL too, when its process is killed mid-write), as for a failed read:
                # UNAVAILABLE, routed around; never a raw gRPC error or a hang.
                err = self.broken or EPError(
                    f"expert worker {self.rank} ({self.target}) failed: {exc}", "UNAVAILABLE",
                    self.rank)
                self.fail(err)
                raise err from exc
        size = req.ByteSize()
        self.bytes_sent += size
        _SENT.inc(size)
        timing.sent = time.perf_counter()
        return fut

    async def info(self, timeout_s: float) -> expert_pb2.WorkerInfo:
        return await self.stub.Info(expert_pb2.WorkerInfoRequest(), timeout=timeout_s)

    async def _stop_call(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
            self.reader = None

    async def close(self) -> None:
        if self.call is not None and self.broken is None:
            try:
                await asyncio.wait_for(self.call.done_writing(), 1.0)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError,
                    TimeoutError):
                pass
        await self._stop_call()
        await self.channel.close()
