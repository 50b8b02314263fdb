"""The attention side of the EP data plane: one long-lived Dispatch stream per expert worker.

dispatch() splits a MoE layer's tokens by worker (ep_plan), sends every share concurrently,
and adds the partial sums in worker order (fp32), so the result does not depend on which reply
arrives first. Every wait has a deadline: a dead or silent worker is a clear EPError, never a
hang. dispatch() is start_dispatch() (plan, encode, write every share) followed by
PendingDispatch.result() (services/engine/pending_dispatch.py: wait, decode, add).

Failover: a worker whose stream broke, or that missed a reply deadline (sized from the
replies seen so far, services/common/deadline.py), is *down*: later dispatches route its
experts to surviving replicas (PlacementTable.route's `down`), and a probe asks it for its
Info every `probe_s` until it answers as the same rank on the same placement version, when a
fresh stream re-admits it (a worker restarted on its endpoint comes back this way). A step
that failed because a worker went down is redone by the engine (services/engine/ep_engine.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc
import structlog
import torch
from prometheus_client import Counter, Gauge

from services.balance.placement import NoLiveReplica, PlacementTable
from services.common.channels import dial
from services.common.deadline import ObservedDeadline
from services.engine.ep_plan import plan_dispatch
from services.engine.pending_dispatch import PendingDispatch
from services.engine.tensor_proto import dtype_to_proto, proto_fields
from services.engine.wire import WIRE_MODES, encode, encode_rows
from services.engine.worker_stream import EPError, WorkerStream, WorkerTiming
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc

__all__ = ["EPError", "ExpertClient", "PendingDispatch", "WorkerTiming", "table_from_infos"]

log = structlog.get_logger("ep_client")
WORKERS_DOWN = Gauge("epserve_ep_workers_down", "expert workers this instance routes around")
WORKER_DOWN_EVENTS = Counter("epserve_ep_worker_down_total",
                             "expert workers marked down, by reason", ["reason"])
READMITTED = Counter("epserve_ep_worker_readmitted_total", "expert workers re-admitted")


class ExpertClient:
    def __init__(self, endpoints: list[str], table: PlacementTable, wire: str = "fp32",
                 timeout_s: float = 30.0, name: str = "attn", probe_s: float = 0.2,
                 min_deadline_s: float = 0.5) -> None:
        if wire not in WIRE_MODES:
            raise ValueError(f"wire must be one of {sorted(WIRE_MODES)}")
        if len(endpoints) != table.num_workers:
            raise ValueError(f"{len(endpoints)} endpoints for {table.num_workers} workers")
        self.table, self.wire, self.timeout_s, self.name = table, wire, timeout_s, name
        self.dispatch_dtype, self.combine_dtype = WIRE_MODES[wire]
        self.streams = [WorkerStream(r, t) for r, t in enumerate(endpoints)]
        self.deadlines = ObservedDeadline(min(min_deadline_s, timeout_s), timeout_s)
        self.probe_s = probe_s
        self.down: dict[int, str] = {}  # rank -> why it is routed around
        self._changed = asyncio.Event()  # a rank went down or came back
        self._prober: asyncio.Task | None = None
        self._steps = itertools.count(1)

    @classmethod
    async def connect(cls, endpoints: list[str], wire: str = "fp32", timeout_s: float = 30.0,
                      name: str = "attn") -> ExpertClient:
        """A started client whose placement table is read back from the workers themselves."""
        infos = []
        for rank, target in enumerate(endpoints):
            async with dial(target, "expert-worker") as ch:
                try:
                    infos.append(await expert_pb2_grpc.ExpertWorkerStub(ch).Info(
                        expert_pb2.WorkerInfoRequest(), timeout=timeout_s))
                except grpc.aio.AioRpcError as exc:
                    raise EPError(f"expert worker {rank} at {target} unreachable: "
                                  f"{exc.code().name}", rank=rank) from exc
        client = cls(endpoints, table_from_infos(infos), wire, timeout_s, name)
        await client.start()
        return client

    async def start(self, lost: tuple[int, ...] = ()) -> None:
        """Check each worker's rank and placement version and open its stream. A worker that
        does not answer, or that the placement names as `lost` (placed around), starts down
        (the probe re-admits it) as long as one does not."""
        for rank in lost:
            self._mark_down(rank, "placed around by the scheduler", "lost")
        for s in self.streams:
            if s.rank in self.down:
                continue
            try:
                info = await s.info(min(self.timeout_s, 5.0))
            except grpc.aio.AioRpcError as exc:
                self._mark_down(s.rank, f"unreachable: {exc.code().name}", "unreachable")
                continue
            if info.rank != s.rank or info.placement_version != self.table.version:
                raise EPError(f"worker at {s.target} is rank {info.rank} placement "
                              f"v{info.placement_version}; expected rank {s.rank} "
                              f"v{self.table.version}", "FAILED_PRECONDITION", s.rank)
            s.open()
        if len(self.down) == len(self.streams):
            why = "; ".join(f"{r}: {w}" for r, w in sorted(self.down.items()))
            raise EPError(f"no expert worker reachable ({why})")
        self._prober = asyncio.create_task(self._probe_forever())

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self.streams))

    def new_step(self) -> int:
        return next(self._steps)

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.streams)

    @property
    def bytes_received(self) -> int:
        return sum(s.bytes_received for s in self.streams)

    # ---- failover ---------------------------------------------------------------------------
    def _mark_down(self, rank: int, why: str, reason: str) -> None:
        if rank in self.down:
            return
        self.down[rank] = why
        self.streams[rank].fail(EPError(f"expert worker {rank} is down: {why}", rank=rank))
        WORKERS_DOWN.set(len(self.down))
        WORKER_DOWN_EVENTS.labels(reason=reason).inc()
        log.warning("expert_worker_down", rank=rank, endpoint=self.streams[rank].target,
                    reason=why, client=self.name)
        self._changed.set()

    def abandon(self, ranks, why: str) -> None:
        """Workers that missed a reply deadline: route around them until they answer again."""
        for rank in ranks:
            self._mark_down(rank, why, "deadline")

    def _down_now(self) -> frozenset[int]:
        for s in self.streams:  # a stream that broke since the last dispatch
            if s.broken is not None and s.rank not in self.down:
                self._mark_down(s.rank, str(s.broken), "stream")
        return frozenset(self.down)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            for rank in sorted(self.down):
                await self._probe(rank)

    async def _probe(self, rank: int) -> None:
        s = self.streams[rank]
        try:
            info = await s.info(max(self.probe_s, 0.5))
        except (TimeoutError, grpc.aio.AioRpcError):
            return
        if info.rank != rank or info.placement_version != self.table.version:
            return  # another placement: the topology follower switches clients
        await s.reopen()
        del self.down[rank]
        WORKERS_DOWN.set(len(self.down))
        READMITTED.inc()
        log.info("expert_worker_readmitted", rank=rank, endpoint=s.target, client=self.name)
        self._changed.set()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Until a worker goes down or comes back (or `timeout_s` passes)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    # ---- dispatch ---------------------------------------------------------------------------
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
        try:
            shares = plan_dispatch(self.table, layer_id, topk_ids, self._down_now())
        except NoLiveReplica as exc:
            down = "; ".join(f"expert worker {r}: {why}" for r, why in sorted(self.down.items()))
            raise EPError(f"{exc} (down: {down})", no_live_replica=True) from exc
        t_encode = time.perf_counter()
        timings = [WorkerTiming(share.worker) for share in shares]
        rows = [share.rows.numpy() for share in shares]
        hiddens = encode_rows(x, rows, self.dispatch_dtype)
        gates = encode_rows(weights, rows, "fp32")
        combine_dtype = dtype_to_proto(self.combine_dtype)
        sends = []
        for share, timing, hidden, gate in zip(shares, timings, hiddens, gates, strict=True):
            req = expert_pb2.DispatchRequest(
                step_id=step_id, micro_batch=micro_batch, layer_id=layer_id,
                placement_version=self.table.version, hidden=proto_fields(hidden),
                slots=proto_fields(encode(share.slots, "int32")), weights=proto_fields(gate),
                combine_dtype=combine_dtype, trace_tag=tag)
            sends.append(self.streams[share.worker].send(req, timing))
        serialize = time.perf_counter() - t_encode
        deadline_s = self.deadlines.deadline(x.shape[0])
        try:  # a write into a stalled worker's full window must not wait for ever either
            async with asyncio.timeout(deadline_s):  # (no extra task, unlike wait_for)
                futures = await asyncio.gather(*sends)
        except TimeoutError as exc:
            late = tuple(s.worker for s, t in zip(shares, timings, strict=True) if not t.sent)
            self.abandon(late, f"write not done within {deadline_s:.2f}s")
            raise EPError(f"writes to expert workers {list(late)} not done within "
                          f"{deadline_s:.2f}s", "DEADLINE_EXCEEDED", ranks=late) from exc
        return PendingDispatch(self, step_id, layer_id, x, shares, futures, timings, t_start,
                               time.perf_counter(), serialize, deadline_s=deadline_s)


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
