"""An attention instance's EP engine kept on the scheduler's expert topology.

The scheduler keeps the placement table and the workers' endpoints in a JetStream KV key.
This follows that key: when it changes, a client for the new topology is built and started
off the step path, and handed to the engine, which switches at its next step boundary (never
mid-step) and closes the old client. A step a worker refuses as stale (FAILED_PRECONDITION:
we were idle through a rebalance and it released the old slots) asks `latest_client()`.
"""

from __future__ import annotations

import asyncio

import structlog

from services.balance.placement_proto import table_from
from services.common import subjects
from services.common.control import follow_key, topology_complete, wait_for_topology
from services.engine.ep_client import EPError, ExpertClient
from services.engine.ep_engine import EPEngine
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("topology")


class TopologyFollower:
    def __init__(self, engine: EPEngine, topology_kv, wire: str = "fp32",
                 timeout_s: float = 30.0, poll_s: float = 0.2, name: str = "attn") -> None:
        self.engine, self.kv, self.wire = engine, topology_kv, wire
        self.timeout_s, self.poll_s, self.name = timeout_s, poll_s, name
        self._topology: control_pb2.Topology | None = None
        self._watcher: asyncio.Task | None = None
        self.switches = 0

    @property
    def placement_version(self) -> int:
        return self._topology.version if self._topology is not None else 0

    async def start(self, wait_s: float = 300.0) -> None:
        topo = await wait_for_topology(self.kv, wait_s)
        self.engine.switch_client(await self._client(topo))
        self._topology = topo
        self.engine.on_stale_placement = self.latest_client
        self._watcher = asyncio.create_task(self._watch())
        log.info("ep_topology_adopted", version=topo.version, workers=list(topo.worker_endpoints))

    async def _client(self, topo: control_pb2.Topology) -> ExpertClient:
        client = ExpertClient(list(topo.worker_endpoints), table_from(topo), self.wire,
                              self.timeout_s, self.name)
        await client.start(tuple(topo.lost_ranks))
        return client

    async def _watch(self) -> None:
        while True:
            try:
                async for topo in follow_key(self.kv, subjects.TOPOLOGY_KEY,
                                             control_pb2.Topology, self.poll_s):
                    if topology_complete(topo) and topo != self._topology:
                        await self._switch(topo)
            except EPError as exc:  # a worker of the new topology not reachable yet: retry
                log.info("ep_topology_not_ready", error=str(exc))
                await asyncio.sleep(self.poll_s)

    async def _switch(self, topo: control_pb2.Topology) -> ExpertClient:
        client = await self._client(topo)
        self.engine.switch_client(client)
        self._topology = topo
        self.switches += 1
        log.info("ep_topology_switched", version=topo.version, workers=list(topo.worker_endpoints))
        return client

    async def latest_client(self) -> ExpertClient | None:
        """A started client for the topology in NATS now (waiting for a roll-out to name its
        workers), or None when it is the one in use."""
        topo = await wait_for_topology(self.kv, self.timeout_s)
        if topo == self._topology:
            return None
        return await self._switch(topo)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.engine.close()
