"""An attention instance's link to the expert workers, following the scheduler's topology.

The scheduler keeps the placement table and the workers' endpoints in a JetStream KV key.
This polls that key and, when it changes, builds a client for the new topology and switches
to it at the next step boundary (never mid-step), then closes the old one.
"""

from __future__ import annotations

import asyncio

import structlog
import torch

from services.balance.placement_proto import table_from
from services.common import subjects
from services.common.control import kv_get, wait_for_topology
from services.engine.ep_client import EPError, ExpertClient
from services.engine.ep_engine import EPEngine
from services.model.batch import AttentionBatch
from services.model.deepseek import DeepseekModel
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("ep_instance")


class EPInstance:
    def __init__(self, model: DeepseekModel, topology_kv, wire: str = "fp32",
                 timeout_s: float = 30.0, poll_s: float = 0.2, name: str = "attn") -> None:
        self.model, self.kv, self.wire = model, topology_kv, wire
        self.timeout_s, self.poll_s, self.name = timeout_s, poll_s, name
        self.engine: EPEngine | None = None
        self._topology: control_pb2.Topology | None = None
        self._pending: control_pb2.Topology | None = None
        self._watcher: asyncio.Task | None = None
        self.switches = 0

    @property
    def placement_version(self) -> int:
        return self._topology.version if self._topology is not None else 0

    async def start(self, wait_s: float = 300.0) -> None:
        topo = await wait_for_topology(self.kv, wait_s)
        self.engine = EPEngine(self.model, await self._client(topo))
        self._topology = topo
        self._watcher = asyncio.create_task(self._watch())
        log.info("ep_topology_adopted", version=topo.version, workers=list(topo.worker_endpoints))

    async def _client(self, topo: control_pb2.Topology) -> ExpertClient:
        client = ExpertClient(list(topo.worker_endpoints), table_from(topo), self.wire,
                              self.timeout_s, self.name)
        await client.start()
        return client

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                topo = await kv_get(self.kv, subjects.TOPOLOGY_KEY, control_pb2.Topology)
            except Exception as exc:  # NATS restarting: keep the current topology
                log.debug("topology_poll_failed", error=str(exc))
                continue
            if topo is not None and topo.worker_endpoints and all(topo.worker_endpoints) \
                    and topo != self._topology:
                self._pending = topo

    async def refresh_now(self) -> None:
        """Read the topology immediately (after a worker said our placement is stale)."""
        topo = await kv_get(self.kv, subjects.TOPOLOGY_KEY, control_pb2.Topology)
        if topo is not None and topo != self._topology and topo.worker_endpoints \
                and all(topo.worker_endpoints):
            self._pending = topo

    async def _adopt_pending(self) -> None:
        topo, self._pending = self._pending, None
        if topo is None or topo == self._topology:
            return
        new_client = await self._client(topo)
        old = self.engine.client
        self.engine.client, self._topology = new_client, topo
        self.switches += 1
        log.info("ep_topology_switched", version=topo.version, workers=list(topo.worker_endpoints))
        await old.close()

    async def forward(self, input_ids: torch.Tensor, batch: AttentionBatch,
                      caches: list[torch.Tensor]) -> torch.Tensor:
        """One step; a pending topology is adopted first (a step boundary)."""
        if self._pending is not None:
            await self._adopt_pending()
        try:
            return await self.engine.forward(input_ids, batch, caches)
        except EPError as exc:
            # A worker no longer serves our placement version (we were idle through a
            # rebalance and it released the old slots): adopt the new topology, redo the step.
            # Redoing is safe: a step rewrites the same KV positions with the same values.
            if exc.code != "FAILED_PRECONDITION":
                raise
            topo = await wait_for_topology(self.kv, self.timeout_s)  # a roll-out may be on
            if topo == self._topology:
                raise
            self._pending = topo
            await self._adopt_pending()
            log.info("ep_step_redone_on_new_placement", version=self.placement_version)
            return await self.engine.forward(input_ids, batch, caches)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.engine is not None:
            await self.engine.client.close()
