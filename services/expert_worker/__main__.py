"""`epserve serve expert-worker`: one EP rank holding its placement's expert slots."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import structlog
import torch

from services.balance.naive import contiguous_placement
from services.balance.placement import PlacementTable
from services.balance.placement_proto import table_from
from services.common import subjects
from services.common.control import connect, kv_bucket, wait_for_topology
from services.common.health import add_health
from services.common.heartbeat import HeartbeatPublisher
from services.common.logging import configure_logging
from services.common.metrics_http import start_metrics_http
from services.common.shutdown import StopEvent, drain, install_signal_handlers
from services.expert_worker.config import ExpertWorkerConfig
from services.expert_worker.core import ExpertWorkerCore
from services.expert_worker.metrics import WorkerMetrics, register_load_collector
from services.expert_worker.rollout import LoadReporter, PlacementFollower
from services.expert_worker.server import ExpertWorkerServicer
from services.model.config import ModelConfig
from services.model.loader import LoadReport, load_expert_banks, parse_dtype
from services.protos_gen.epserve.v1 import control_pb2, expert_pb2, expert_pb2_grpc

log = structlog.get_logger("expert_worker")
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20)]


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


async def serve(cfg: ExpertWorkerConfig) -> int:
    configure_logging("expert-worker", cfg.rank, cfg.log_level)
    _pin(cfg)
    model_cfg = ModelConfig.from_dir(cfg.model)
    nc = await connect(cfg.nats_url, f"expert-worker-{cfg.rank}") if cfg.nats_url else None
    table = await placement_for(cfg, model_cfg, nc)
    if cfg.rank >= table.num_workers:
        raise ValueError(f"rank {cfg.rank} but the placement has {table.num_workers} workers")
    slots = table.slots_of_worker(cfg.rank)
    layout = {layer: [(s, table.phy2log[i][s]) for s in slots]
              for i, layer in enumerate(table.layer_ids)}
    report = LoadReport()
    banks = load_expert_banks(cfg.model, layout, parse_dtype(cfg.dtype), cfg.device, report)
    core = ExpertWorkerCore(model_cfg, cfg.rank, table, banks, cfg.device, parse_dtype(cfg.dtype))
    core.warm_up()
    info = expert_pb2.WorkerInfo(
        rank=cfg.rank, device=cfg.device, placement_version=table.version,
        num_workers=table.num_workers, expert_tensors_read=len(report.tensors_read),
        expert_bytes_read=report.bytes_read, resident_bytes=resident_bytes())
    for layer, entries in layout.items():
        for slot, logical in entries:
            info.slots.add(layer_id=layer, slot=slot, logical_expert=logical)
    metrics = WorkerMetrics()
    register_load_collector(core)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    health = await add_health(server)
    servicer = ExpertWorkerServicer(core, info, metrics)
    expert_pb2_grpc.add_ExpertWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    if cfg.port_file:
        Path(cfg.port_file).write_text(str(port))
    metrics_port = start_metrics_http(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    heartbeat = None
    tasks: list[asyncio.Task] = []
    if nc is not None:
        heartbeat = HeartbeatPublisher(
            nc, "expert-worker", f"expert-worker-{cfg.rank}", f"{cfg.advertise_host or cfg.host}:{cfg.advertise_port or port}",
            cfg.heartbeat_interval_s, rank=cfg.rank, placement_version=lambda: core.placement_version)
        heartbeat.state = control_pb2.STATE_SERVING
        heartbeat.start()
        if cfg.load_report_interval_s > 0:
            tasks.append(asyncio.create_task(
                LoadReporter(nc, core, cfg.load_report_interval_s).run()))
        if not cfg.placement:  # placements come from the scheduler: follow its rebalances

            async def adopted(new_table: PlacementTable) -> None:
                servicer.info = worker_info(cfg, new_table, info)
                await heartbeat.publish_now()

            topology_kv = await kv_bucket(nc.jetstream(), subjects.TOPOLOGY_BUCKET)
            tasks.append(asyncio.create_task(PlacementFollower(
                core, topology_kv, cfg.model, parse_dtype(cfg.dtype), cfg.device,
                cfg.topology_poll_s, cfg.release_after_s, adopted).run()))
    await health.set_serving()
    log.info("expert_worker_ready", port=port, metrics_port=metrics_port, device=cfg.device,
             placement_version=table.version, slots=list(slots),
             expert_tensors_read=len(report.tensors_read), resident_bytes=resident_bytes())
    stop = StopEvent()

    async def on_stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if heartbeat is not None:
            await heartbeat.set_state(control_pb2.STATE_DRAINING)
        await drain(health=health, grace_s=cfg.drain_grace_s, finish_in_flight=servicer.wait_idle,
                    server=server, server_grace_s=5.0)
        if heartbeat is not None:
            await heartbeat.stop()
            await nc.drain()
        stop.set("signal")

    install_signal_handlers(asyncio.get_running_loop(), on_stop)
    await stop.wait()
    log.info("expert_worker_stopped")
    return 0
