"""`epserve serve router`: the gRPC edge of the cluster.

The one service lifecycle (services/common/service.py) with: setup = the usage stream, the
heartbeats of prefill and decode instances feeding the instance view, the request flow;
until_ready = the HTTP API, and at least one prefill and one decode instance eligible (or
`--instance-wait-s` passed: then the router exits, to be restarted). A drain stops
admitting (UNAVAILABLE) before anything else.
"""

from __future__ import annotations

import asyncio
import sys
import time

import structlog

from services.auth.keyring import KeyRing, open_keys_bucket
from services.common import subjects
from services.common.channels import Channels
from services.common.control import ensure_usage_stream
from services.common.deadline import ObservedDeadline
from services.common.load import InstanceLoad
from services.common.service import Service
from services.common.states import InstanceState, Role
from services.model.config import ModelConfig
from services.model.tokenizer import Tokenizer
from services.protos_gen.epserve.v1 import control_pb2, inference_pb2_grpc
from services.router import metrics
from services.router.access import Access
from services.router.admission import Admission
from services.router.attempt import Parts
from services.router.choice import InstanceChooser
from services.router.config import RouterConfig
from services.router.encoder_pool import EncoderPool, longest_token_bytes
from services.router.flow import RequestFlow
from services.router.instances import DECODE, PREFILL, ROLES, InstanceReport, InstanceView
from services.router.openai_http import OpenAIHttp
from services.router.prefix_view import PrefixCacheView
from services.router.server import Gateway, RouterServicer
from services.router.usage import UsagePublisher
from services.router.validation import ModelLimits

log = structlog.get_logger("router")


def report_from(hb: control_pb2.Heartbeat) -> InstanceReport:
    return InstanceReport(
        instance_id=hb.instance_id, role=Role.from_proto(hb.role) or "", endpoint=hb.endpoint,
        state=InstanceState.from_proto(hb.state), load=InstanceLoad.from_proto(hb.load))


def watch_instances(view: InstanceView):
    async def on_heartbeat(msg) -> None:
        hb = control_pb2.Heartbeat()
        try:
            hb.ParseFromString(msg.data)
        except Exception as exc:
            log.warning("heartbeat_undecodable", subject=msg.subject, error=str(exc))
            return
        view.heard(time.monotonic())
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


class RouterService(Service):
    role = "router"
    mesh_server = False  # the public API (API keys); its channels to instances use mTLS

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__(cfg)
        self.model_cfg = ModelConfig.from_dir(cfg.model)
        self.tokenizer = Tokenizer.from_dir(cfg.model)
        context = self.model_cfg.max_position_embeddings
        prompt_limit = cfg.prompt_bytes_limit(context, longest_token_bytes(self.tokenizer))
        self.limits = ModelLimits(cfg.served_model_name, context, self.model_cfg.vocab_size,
                                  prompt_limit)
        self.request_limit = cfg.request_bytes_limit(prompt_limit)
        self.encoder = EncoderPool.from_dir(cfg.model, self.tokenizer, cfg.tokenize_threads,
                                            cfg.max_inflight)
        self.view = InstanceView(cfg.dead_after_s)
        self.admission = Admission(cfg.max_inflight)
        self.channels = Channels()
        self.http: OpenAIHttp | None = None

    async def setup(self) -> None:
        cfg = self.cfg
        js = self.nc.jetstream()
        await ensure_usage_stream(js)
        self.sub = await self.nc.subscribe(subjects.HEARTBEAT_ALL, cb=watch_instances(self.view))
        self.prefix_view = PrefixCacheView(time.time)

        async def on_prefix_keys(msg) -> None:
            self.prefix_view.on_message(msg.data)

        self.prefix_sub = await self.nc.subscribe(subjects.PREFIX_CACHE_ALL, cb=on_prefix_keys)
        context = self.model_cfg.max_position_embeddings
        parts = Parts(
            self.view, InstanceChooser(cfg.balancer, context), self.channels, time.monotonic,
            cfg.prefill_retries, cfg.decode_attempts, cfg.failover_wait_s,
            token_gaps=ObservedDeadline(cfg.token_gap_floor_s, cfg.request_timeout_s,
                                        window=512, warmup=16, quantile=0.99),
            prefills=ObservedDeadline(cfg.prefill_floor_s, cfg.request_timeout_s, warmup=4),
            prefix_view=self.prefix_view)
        flow = RequestFlow(parts, self.tokenizer, cfg.request_timeout_s, cfg.migration_limit,
                           self.model_cfg.eos_token_id, context)
        self.usage = UsagePublisher(js, spool_dir=cfg.usage_spool_dir or None)
        await self.usage.start()  # records an earlier process spooled go out now
        self.keyring = KeyRing(await open_keys_bucket(js)) if cfg.api_keys else None
        if self.keyring is not None:
            await self.keyring.start()
        self.gateway = Gateway(self.limits, self.encoder, self.admission, flow, self.usage,
                               Access(self.keyring))

    def add_servicers(self, server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(
            RouterServicer(self.gateway, self.model_cfg), server)

    def max_request_bytes(self) -> int:
        return self.request_limit

    def heartbeat_fields(self) -> dict:
        return {"load": lambda: control_pb2.InstanceLoad(
            queued_requests=self.admission.in_flight)}

    async def until_ready(self) -> None:
        cfg = self.cfg
        if cfg.http_port >= 0:
            self.http = OpenAIHttp(self.gateway, self.model_cfg, self.request_limit)
            await self.http.start(cfg.host, cfg.http_port)
        # SERVING only once a request can be served: a load balancer that sends this router
        # its first request before then would get "0 of 0 prefill instances eligible".
        if not await wait_for_instances(self.view, cfg.instance_wait_s):
            now = time.monotonic()
            raise RuntimeError(f"no eligible prefill and decode instance after "
                               f"{cfg.instance_wait_s}s ({self.view.describe(PREFILL, now)}; "
                               f"{self.view.describe(DECODE, now)})")

    def ready_fields(self) -> dict:
        return {"model": self.limits.name, "http_port": self.http.port if self.http else None,
                "max_prompt_bytes": self.limits.max_prompt_bytes,
                "max_request_bytes": self.request_limit}

    def begin_drain(self) -> None:
        self.admission.start_draining()

    async def finish_in_flight(self) -> None:
        while self.admission.in_flight:
            await asyncio.sleep(0.05)

    async def stop_core(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.usage.close()
        await self.sub.unsubscribe()
        await self.prefix_sub.unsubscribe()
        if self.keyring is not None:
            await self.keyring.stop()
        await self.channels.close()
        self.encoder.close()


async def serve(cfg: RouterConfig) -> int:
    return await RouterService(cfg).run()


if __name__ == "__main__":
    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(RouterConfig))))
