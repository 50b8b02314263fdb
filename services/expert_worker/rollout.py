"""An expert worker's side of live rebalancing, over NATS.

- LoadReporter: every interval, the tokens each logical expert received since the last report
  (ExpertLoadReport on epserve.expert_load.<rank>), the scheduler's placement balancer input.
- PlacementFollower: follows the topology key; a newer version is loaded in the background
  (only this rank's new slots are read from the checkpoint, in a thread, while the current
  version keeps serving), warmed up, then advertised in the heartbeat. The scheduler publishes
  the new version's endpoints once every rank advertises it; attention instances switch at a
  step boundary; the old version's slots are released once unused for `release_after_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from services.balance.placement import PlacementTable
from services.balance.placement_proto import table_from
from services.common import subjects
from services.common.control import follow_key
from services.expert_worker.core import ExpertWorkerCore
from services.model.loader import load_expert_banks
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("expert_worker.rollout")


class LoadReporter:
    def __init__(self, nc, core: ExpertWorkerCore, interval_s: float) -> None:
        self.nc, self.core, self.interval_s = nc, core, interval_s
        self._last: dict[int, list[int]] = {}
        self._since = time.time()

    def report(self) -> control_pb2.ExpertLoadReport | None:
        """The difference since the previous report; None when nothing was routed here."""
        now_counts = self.core.logical_load()
        n = self.core.cfg.n_routed_experts
        layers = sorted(now_counts)
        # A count below the last one was reset (the Load RPC with reset=True): count from 0.
        diff = [c - p if c >= p else c for layer in layers for c, p in
                zip(now_counts[layer], self._last.get(layer, [0] * n), strict=True)]
        self._last = now_counts
        start, self._since = self._since, time.time()
        if not any(diff):
            return None
        return control_pb2.ExpertLoadReport(
            rank=self.core.rank, placement_version=self.core.placement_version,
            window_start=start, window_end=self._since, layer_ids=layers,
            num_logical_experts=n, logical_tokens=diff)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            msg = self.report()
            if msg is None:
                continue
            try:
                await self.nc.publish(subjects.expert_load(self.core.rank),
                                      msg.SerializeToString())
            except Exception as exc:  # NATS reconnecting: this window's counts are dropped
                log.warning("load_report_failed", error=str(exc))


class PlacementFollower:
    def __init__(self, core: ExpertWorkerCore, topology_kv, model_dir: str, dtype, device: str,
                 poll_s: float, release_after_s: float,
                 on_adopted: Callable[[PlacementTable], object]) -> None:
        self.core, self.kv, self.model_dir = core, topology_kv, model_dir
        self.dtype, self.device = dtype, device
        self.poll_s, self.release_after_s = poll_s, release_after_s
        self.on_adopted = on_adopted
        self.failed_version = 0

    async def run(self) -> None:
        release = asyncio.create_task(self._release_forever())
        try:
            async for topo in follow_key(self.kv, subjects.TOPOLOGY_KEY, control_pb2.Topology,
                                         self.poll_s):
                if topo.version > self.core.placement_version \
                        and topo.version != self.failed_version:
                    await self.prepare(table_from(topo))
        finally:
            release.cancel()
            await asyncio.gather(release, return_exceptions=True)

    async def _release_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            released = self.core.release_unused(self.release_after_s)
            if released:
                log.info("placement_released", versions=released, serving=self.core.versions)

    async def prepare(self, table: PlacementTable) -> None:
        rank = self.core.rank
        if rank >= table.num_workers:
            log.error("placement_without_this_rank", version=table.version,
                      workers=table.num_workers)
            self.failed_version = table.version
            return
        slots = table.slots_of_worker(rank)
        layout = {layer: [(s, table.phy2log[i][s]) for s in slots]
                  for i, layer in enumerate(table.layer_ids)}
        t0 = time.perf_counter()
        try:
            banks = await asyncio.to_thread(load_expert_banks, self.model_dir, layout,
                                            self.dtype, self.device)
            await asyncio.to_thread(self.core.warm_up, banks)
        except Exception as exc:
            log.error("placement_load_failed", version=table.version, error=str(exc))
            self.failed_version = table.version
            return
        self.core.add_placement(table, banks)
        log.info("placement_prepared", version=table.version, serving=self.core.versions,
                 load_s=round(time.perf_counter() - t0, 3))
        result = self.on_adopted(table)
        if asyncio.iscoroutine(result):
            await result
