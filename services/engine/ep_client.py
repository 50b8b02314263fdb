"""The attention side of the EP data plane: one long-lived Dispatch stream per expert worker.

dispatch() splits a MoE layer's tokens by worker (ep_plan), sends every share concurrently,
and adds the partial sums in worker order (fp32), so the result does not depend on which reply
arrives first. Replies on a stream come in request order, so each stream keeps a FIFO of
futures. Every wait has a deadline: a dead or silent worker is a clear EPError, never a hang.

dispatch() is start_dispatch() (plan, encode, write every share: returns a PendingDispatch once
the requests are on the streams) followed by PendingDispatch.result() (wait for the replies,
decode and add them). The pending object keeps the halves' times for traces: per worker when
its request was written and its reply arrived (both time.perf_counter() in this process) and
the compute time the worker reported, measured on the worker's own clock.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field

import grpc
import structlog
import torch
from prometheus_client import Counter, Histogram

from services.balance.placement import PlacementTable
from services.engine.ep_plan import plan_dispatch
from services.engine.tensor_proto import dtype_to_proto, from_proto, to_proto
from services.engine.wire import WIRE_MODES, decode, encode
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc

log = structlog.get_logger("ep_client")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.max_send_message_length", 256 << 20)]

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
WIRE_BYTES = Counter("epserve_ep_bytes", "dispatch message bytes (protobuf ByteSize)",
                     ["direction"])


class EPError(RuntimeError):
    """An expert worker failed, timed out or rejected a dispatch."""

    def __init__(self, message: str, code: str = "UNAVAILABLE", rank: int | None = None) -> None:
        super().__init__(message)
        self.code, self.rank = code, rank


class _WorkerStream:
    def __init__(self, rank: int, target: str) -> None:
        self.rank, self.target = rank, target
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = expert_pb2_grpc.ExpertWorkerStub(self.channel)
        self.call = None
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.write_lock = asyncio.Lock()
        self.broken: EPError | None = None
        self.reader: asyncio.Task | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def open(self) -> None:
        self.call = self.stub.Dispatch()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for reply in self.call:
                size = reply.ByteSize()
                self.bytes_received += size
                WIRE_BYTES.labels(direction="received").inc(size)
                if self.pending:
                    fut = self.pending.popleft()
                    if not fut.done():
                        fut.set_result((reply, time.perf_counter()))
            self._fail(EPError(f"expert worker {self.rank} ({self.target}) closed its stream",
                               rank=self.rank))
        except grpc.aio.AioRpcError as exc:
            self._fail(EPError(f"expert worker {self.rank} ({self.target}) failed: "
                               f"{exc.code().name} {exc.details()}", exc.code().name, self.rank))
        except asyncio.CancelledError:
            self._fail(EPError("dispatch stream closed", rank=self.rank))
            raise

    def _fail(self, err: EPError) -> None:
        self.broken = err
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
        async with self.write_lock:
            self.pending.append(fut)
            try:
                await self.call.write(req)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                # The stream died under the write (the worker went away): the same clear
                # EPError as a failed read, never a raw gRPC error or a hang.
                err = self.broken or EPError(
                    f"expert worker {self.rank} ({self.target}) failed: {exc}",
                    exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "UNAVAILABLE",
                    self.rank)
                self._fail(err)
                raise err from exc
        size = req.ByteSize()
        self.bytes_sent += size
        WIRE_BYTES.labels(direction="sent").inc(size)
        timing.sent = time.perf_counter()
        return fut

    async def close(self) -> None:
        if self.call is not None:
            try:
                await self.call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError):
                pass
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


class ExpertClient:
    def __init__(self, endpoints: list[str], table: PlacementTable, wire: str = "fp32",
                 timeout_s: float = 30.0, name: str = "attn") -> None:
        if wire not in WIRE_MODES:
            raise ValueError(f"wire must be one of {sorted(WIRE_MODES)}")
        if len(endpoints) != table.num_workers:
            raise ValueError(f"{len(endpoints)} endpoints for {table.num_workers} workers")
        self.table, self.wire, self.timeout_s, self.name = table, wire, timeout_s, name
        self.dispatch_dtype, self.combine_dtype = WIRE_MODES[wire]
        self.streams = [_WorkerStream(r, t) for r, t in enumerate(endpoints)]
        self._steps = itertools.count(1)

    @classmethod
    async def connect(cls, endpoints: list[str], wire: str = "fp32", timeout_s: float = 30.0,
                      name: str = "attn") -> ExpertClient:
        """A started client whose placement table is read back from the workers themselves."""
        infos = []
        for rank, target in enumerate(endpoints):
            async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
                try:
                    infos.append(await expert_pb2_grpc.ExpertWorkerStub(ch).Info(
                        expert_pb2.WorkerInfoRequest(), timeout=timeout_s))
                except grpc.aio.AioRpcError as exc:
                    raise EPError(f"expert worker {rank} at {target} unreachable: "
                                  f"{exc.code().name}", rank=rank) from exc
        client = cls(endpoints, table_from_infos(infos), wire, timeout_s, name)
        await client.start()
        return client

    async def start(self) -> None:
        """Check each worker's rank and placement version, then open the streams."""
        for s in self.streams:
            try:
                info = await s.stub.Info(expert_pb2.WorkerInfoRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise EPError(f"expert worker {s.rank} at {s.target} unreachable: "
                              f"{exc.code().name}", rank=s.rank) from exc
            if info.rank != s.rank or info.placement_version != self.table.version:
                raise EPError(f"worker at {s.target} is rank {info.rank} placement "
                              f"v{info.placement_version}; expected rank {s.rank} "
                              f"v{self.table.version}", "FAILED_PRECONDITION", s.rank)
            s.open()

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.streams))

    def new_step(self) -> int:
        return next(self._steps)

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.streams)

    @property
    def bytes_received(self) -> int:
        return sum(s.bytes_received for s in self.streams)

    async def dispatch(self, step_id: int, micro_batch: int, layer_id: int, x: torch.Tensor,
                       topk_ids: torch.Tensor, weights: torch.Tensor, tag: str = "") -> torch.Tensor:
        """x [T, H], topk_ids [T, K] logical, weights [T, K] -> routed output [T, H] fp32."""
        pending = await self.start_dispatch(step_id, micro_batch, layer_id, x, topk_ids, weights,
                                            tag)
        return await pending.result()

    async def start_dispatch(self, step_id: int, micro_batch: int, layer_id: int,
                             x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor,
                             tag: str = "") -> PendingDispatch:
        """Plan, encode and write one MoE layer's shares; returns once every request is on its
        worker's stream. `await pending.result()` gives what dispatch() gives."""
        t_start = time.perf_counter()
        shares = plan_dispatch(self.table, layer_id, topk_ids)
        t_encode = time.perf_counter()
        timings = [WorkerTiming(share.worker) for share in shares]
        sends = []
        for share, timing in zip(shares, timings, strict=True):
            req = expert_pb2.DispatchRequest(
                step_id=step_id, micro_batch=micro_batch, layer_id=layer_id,
                placement_version=self.table.version,
                hidden=to_proto(encode(x[share.rows], self.dispatch_dtype)),
                slots=to_proto(encode(share.slots, "int32")),
                weights=to_proto(encode(weights[share.rows].float(), "fp32")),
                combine_dtype=dtype_to_proto(self.combine_dtype), trace_tag=tag)
            sends.append(self.streams[share.worker].send(req, timing))
        serialize = time.perf_counter() - t_encode
        futures = await asyncio.gather(*sends)
        return PendingDispatch(self, step_id, layer_id, x, shares, futures, timings, t_start,
                               time.perf_counter(), serialize)


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


@dataclass
class PendingDispatch:
    """A dispatch whose requests are on the streams; result() waits for and combines the
    replies. Timestamps are time.perf_counter() seconds in this process."""

    client: ExpertClient
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
    _out: torch.Tensor | None = field(default=None, repr=False)

    async def result(self) -> torch.Tensor:
        """The routed output [T, H] fp32 (on x's device); EPError on a failed, rejecting or
        silent worker (DEADLINE_EXCEEDED after the client's timeout)."""
        if self._out is not None:
            return self._out
        client, layer_id = self.client, self.layer_id
        try:
            arrived = await asyncio.wait_for(asyncio.gather(*self.futures), client.timeout_s)
        except TimeoutError as exc:
            raise EPError(f"no reply from expert workers within {client.timeout_s}s "
                          f"(layer {layer_id}, step {self.step_id})", "DEADLINE_EXCEEDED") from exc
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


def table_from_infos(infos: list[expert_pb2.WorkerInfo]) -> PlacementTable:
    """Rebuild the placement table from every worker's held slots (rank order)."""
    versions = {i.placement_version for i in infos}
    if len(versions) != 1:
        raise EPError(f"expert workers disagree on the placement version: {sorted(versions)}",
                      "FAILED_PRECONDITION")
    layers = sorted({s.layer_id for i in infos for s in i.slots})
    slots: dict[int, dict[int, int]] = {layer: {} for layer in layers}
    for info in infos:
        for s in info.slots:
            slots[s.layer_id][s.slot] = s.logical_expert
    num_slots = len(slots[layers[0]])
    if any(sorted(slots[layer]) != list(range(num_slots)) for layer in layers):
        raise EPError("the workers' slots do not cover a placement table", "FAILED_PRECONDITION")
    phy2log = [[slots[layer][p] for p in range(num_slots)] for layer in layers]
    return PlacementTable(versions.pop(), len(infos), max(max(r) for r in phy2log) + 1,
                          tuple(layers), tuple(tuple(r) for r in phy2log))
