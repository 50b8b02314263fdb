"""`epserve serve expert-worker`: one EP rank holding its placement's expert slots."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

import torch

from services.balance.naive import contiguous_placement
from services.balance.placement import PlacementTable
from services.balance.placement_proto import table_from
from services.common import subjects
from services.common.control import kv_bucket, wait_for_topology
from services.common.service import Service
from services.expert_worker.config import ExpertWorkerConfig
from services.expert_worker.core import ExpertWorkerCore
from services.expert_worker.metrics import WorkerMetrics, register_load_collector
from services.expert_worker.rollout import LoadReporter, PlacementFollower
from services.expert_worker.server import ExpertWorkerServicer
from services.model.config import ModelConfig
from services.model.loader import LoadReport, load_expert_banks, parse_dtype
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def placement_for(cfg: ExpertWorkerConfig, model_cfg: ModelConfig, nc) -> PlacementTable:
    """A placement file, else the scheduler's topology on NATS, else the contiguous plan."""
    if cfg.placement:
        return PlacementTable.from_dict(json.loads(Path(cfg.placement).read_text()))
    if nc is not None:
        kv = await kv_bucket(nc.jetstream(), subjects.TOPOLOGY_BUCKET)
        return table_from(await wait_for_topology(kv, timeout=300.0, need_endpoints=False))
    return contiguous_placement(model_cfg.n_routed_experts, cfg.num_workers,
                                model_cfg.moe_layer_ids, redundant=cfg.redundant_experts)


def worker_info(cfg: ExpertWorkerConfig, table: PlacementTable,
                previous: expert_pb2.WorkerInfo) -> expert_pb2.WorkerInfo:
    """WorkerInfo for a newly adopted placement (what Info reports: the newest version)."""
    info = expert_pb2.WorkerInfo()
    info.CopyFrom(previous)
    info.placement_version = table.version
    info.num_workers = table.num_workers
    info.resident_bytes = resident_bytes()
    del info.slots[:]
    for i, layer in enumerate(table.layer_ids):
        for slot in table.slots_of_worker(cfg.rank):
            info.slots.add(layer_id=layer, slot=slot, logical_expert=table.phy2log[i][slot])
    return info


def _pin(cfg: ExpertWorkerConfig) -> None:
    if cfg.core_list:
        os.sched_setaffinity(0, cfg.core_list)
        torch.set_num_threads(len(cfg.core_list))


class ExpertWorkerService(Service):
    role = "expert-worker"

    def __init__(self, cfg: ExpertWorkerConfig) -> None:
        super().__init__(dataclasses.replace(cfg, instance_id=cfg.member_id))
        self.tasks: list[asyncio.Task] = []

    def log_rank(self) -> int:
        return self.cfg.rank

    async def setup(self) -> None:
        cfg = self.cfg
        _pin(cfg)
        model_cfg = ModelConfig.from_dir(cfg.model)
        table = await placement_for(cfg, model_cfg, self.nc)
        if cfg.rank >= table.num_workers:
            raise ValueError(f"rank {cfg.rank} but the placement has {table.num_workers} workers")
        self.slots = table.slots_of_worker(cfg.rank)
        layout = {layer: [(s, table.phy2log[i][s]) for s in self.slots]
                  for i, layer in enumerate(table.layer_ids)}
        self.report = LoadReport()
        banks = load_expert_banks(cfg.model, layout, parse_dtype(cfg.dtype), cfg.device,
                                  self.report)
        self.core = ExpertWorkerCore(model_cfg, cfg.rank, table, banks, cfg.device,
                                     parse_dtype(cfg.dtype))
        self.core.warm_up()
        self.info = info = expert_pb2.WorkerInfo(
            rank=cfg.rank, device=cfg.device, placement_version=table.version,
            num_workers=table.num_workers, expert_tensors_read=len(self.report.tensors_read),
            expert_bytes_read=self.report.bytes_read, resident_bytes=resident_bytes())
        for layer, entries in layout.items():
            for slot, logical in entries:
                info.slots.add(layer_id=layer, slot=slot, logical_expert=logical)
        register_load_collector(self.core)
        self.servicer = ExpertWorkerServicer(self.core, info, WorkerMetrics(), cfg.compute_thread)

    def add_servicers(self, server) -> None:
        expert_pb2_grpc.add_ExpertWorkerServicer_to_server(self.servicer, server)

    def heartbeat_fields(self) -> dict:
        cfg = self.cfg
        return {"endpoint": cfg.advertised(cfg.advertise_port or self.port), "rank": cfg.rank,
                "placement_version": lambda: self.core.placement_version}

    async def until_ready(self) -> None:
        cfg, nc = self.cfg, self.nc
        if nc is None:
            return
        if cfg.load_report_interval_s > 0:
            self.tasks.append(asyncio.create_task(
                LoadReporter(nc, self.core, cfg.load_report_interval_s).run()))
        if not cfg.placement:  # placements come from the scheduler: follow its rebalances

            async def adopted(new_table: PlacementTable) -> None:
                self.servicer.info = worker_info(cfg, new_table, self.info)
                await self.heartbeat.publish_now()

            topology_kv = await kv_bucket(nc.jetstream(), subjects.TOPOLOGY_BUCKET)
            self.tasks.append(asyncio.create_task(PlacementFollower(
                self.core, topology_kv, cfg.model, parse_dtype(cfg.dtype), cfg.device,
                cfg.topology_poll_s, cfg.release_after_s, adopted).run()))

    def ready_fields(self) -> dict:
        return {"device": self.cfg.device, "placement_version": self.core.placement_version,
                "slots": list(self.slots), "expert_tensors_read": len(self.report.tensors_read),
                "resident_bytes": resident_bytes()}

    async def finish_in_flight(self) -> None:
        for task in self.tasks:  # no new placement adoption or load report while draining
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.servicer.wait_idle()


async def serve(cfg: ExpertWorkerConfig) -> int:
    return await ExpertWorkerService(cfg).run()
