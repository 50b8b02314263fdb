"""`epserve serve router`: the gRPC edge of the cluster.

Start-up: logging -> model config and tokenizer -> NATS (heartbeats of prefill and decode
instances feed the instance view; the usage stream) -> gRPC server -> SERVING once at least
one prefill and one decode instance are eligible (or `--instance-wait-s` passes).
SIGTERM: stop admitting (UNAVAILABLE), NOT_SERVING, let in-flight requests finish, exit.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import grpc
import structlog

from services.common import subjects
from services.common.channels import Channels
from services.common.control import connect, ensure_usage_stream
from services.common.health import add_health
from services.common.heartbeat import HeartbeatPublisher
from services.common.logging import configure_logging
from services.common.metrics_http import start_metrics_http
from services.common.shutdown import StopEvent, drain, install_signal_handlers
from services.model.config import ModelConfig
from services.model.tokenizer import Tokenizer
from services.protos_gen.epserve.v1 import control_pb2, inference_pb2_grpc
from services.router import metrics
from services.router.admission import Admission
from services.router.choice import InstanceChooser
from services.router.config import RouterConfig
from services.router.flow import RequestFlow
from services.router.instances import DECODE, PREFILL, ROLES, InstanceReport, InstanceView
from services.router.openai_http import OpenAIHttp
from services.router.server import Gateway, RouterServicer
from services.router.usage import UsagePublisher
from services.router.validation import ModelLimits

log = structlog.get_logger("router")


def report_from(hb: control_pb2.Heartbeat) -> InstanceReport:
    load = hb.load
    return InstanceReport(
        instance_id=hb.instance_id, role=subjects.ROLE_NAMES.get(hb.role, ""),
        endpoint=hb.endpoint, state=subjects.STATE_NAMES.get(hb.state, "starting"),
        queued_tokens=load.queued_tokens, attention_cost=load.attention_cost,
        running_requests=load.running_requests, kv_blocks_in_use=load.kv_blocks_in_use,
        kv_blocks_total=load.kv_blocks_total)


def watch_instances(view: InstanceView):
    async def on_heartbeat(msg) -> None:
        hb = control_pb2.Heartbeat()
        try:
            hb.ParseFromString(msg.data)
        except Exception as exc:
            log.warning("heartbeat_undecodable", subject=msg.subject, error=str(exc))
            return
        view.observe(report_from(hb), time.monotonic())
        for role in ROLES:
            metrics.ELIGIBLE.labels(role=role).set(len(view.eligible(role, time.monotonic())))
    return on_heartbeat


async def wait_for_instances(view: InstanceView, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        now = time.monotonic()
        if view.eligible(PREFILL, now) and view.eligible(DECODE, now):
            return True
        await asyncio.sleep(0.05)
    return False


async def serve(cfg: RouterConfig) -> int:
    instance_id = cfg.instance_id or f"router-{socket.gethostname()}-{os.getpid()}"
    configure_logging("router", None, cfg.log_level)
    model_cfg = ModelConfig.from_dir(cfg.model)
    tokenizer = Tokenizer.from_dir(cfg.model)
    limits = ModelLimits(cfg.served_model_name, model_cfg.max_position_embeddings,
                         model_cfg.vocab_size)
    nc = await connect(cfg.nats_url, instance_id)
    js = nc.jetstream()
    await ensure_usage_stream(js)
    view = InstanceView(cfg.dead_after_s)
    sub = await nc.subscribe("epserve.heartbeat.*.*", cb=watch_instances(view))
    admission = Admission(cfg.max_inflight)
    channels = Channels()
    flow = RequestFlow(view, InstanceChooser(cfg.balancer), channels, tokenizer,
                       cfg.request_timeout_s, cfg.prefill_retries, cfg.decode_attempts)
    usage = UsagePublisher(js)
    server = grpc.aio.server()
    health = await add_health(server)
    gateway = Gateway(limits, tokenizer, admission, flow, usage)
    inference_pb2_grpc.add_InferenceServicer_to_server(RouterServicer(gateway, model_cfg), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    http = None
    if cfg.http_port >= 0:
        http = OpenAIHttp(gateway, model_cfg)
        await http.start(cfg.host, cfg.http_port)
    metrics_port = start_metrics_http(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    heartbeat = HeartbeatPublisher(
        nc, "router", instance_id, f"{cfg.advertise_host or cfg.host}:{port}",
        cfg.heartbeat_interval_s,
        load=lambda: control_pb2.InstanceLoad(queued_requests=admission.in_flight),
        metrics_endpoint=f"{cfg.advertise_host or cfg.host}:{metrics_port}" if metrics_port else "")
    heartbeat.start()
    if not await wait_for_instances(view, cfg.instance_wait_s):
        log.warning("no_instances_yet", prefill=view.describe(PREFILL, time.monotonic()),
                    decode=view.describe(DECODE, time.monotonic()))
    if cfg.port_file:
        Path(cfg.port_file).write_text(str(port))
    await heartbeat.set_state(control_pb2.STATE_SERVING)
    await health.set_serving()
    log.info("router_ready", port=port, metrics_port=metrics_port, model=limits.name,
             http_port=http.port if http else None)
    stop = StopEvent()

    async def finish_in_flight() -> None:
        while admission.in_flight:
            await asyncio.sleep(0.05)

    async def on_stop() -> None:
        admission.start_draining()
        await heartbeat.set_state(control_pb2.STATE_DRAINING)
        await drain(health=health, grace_s=cfg.drain_grace_s, finish_in_flight=finish_in_flight,
                    server=server, server_grace_s=5.0)
        if http is not None:
            await http.stop()
        await usage.flush()
        await sub.unsubscribe()
        await heartbeat.stop()
        await channels.close()
        await nc.drain()
        stop.set("signal")

    install_signal_handlers(asyncio.get_running_loop(), on_stop)
    await stop.wait()
    log.info("router_stopped")
    return 0


if __name__ == "__main__":
    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(RouterConfig))))
