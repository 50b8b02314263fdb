"""What prefill and decode instances share: the attention-only model and the EP engine that
follows the scheduler's topology and overlap plan, inside the one service lifecycle
(services/common/service.py).

setup: attention-only model (no routed experts) and an EP engine without experts yet; the
subclass builds its core. until_ready: the scheduler's expert topology (the engine's first
client) and overlap plan. stop_core: the subclass's core, the watchers, the trace, the client.
"""

from __future__ import annotations

import structlog

from services.attention.config import AttentionConfig
from services.attention.plan_watch import PlanWatcher
from services.attention.topology import TopologyFollower
from services.common import subjects
from services.common.control import kv_bucket
from services.common.service import Service
from services.engine.ep_engine import EPEngine
from services.engine.trace import ChromeTrace
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model, parse_dtype
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("attention_service")


class AttentionService(Service):
    """Subclasses build `self.core` in `build_core()` (a prefill or decode core: start(),
    finish_in_flight(), stop()) around `self.engine.forward`."""

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__(cfg)
        self.model_cfg = ModelConfig.from_dir(cfg.model)
        self.dtype = parse_dtype(cfg.dtype)
        self.engine: EPEngine | None = None
        self.topology: TopologyFollower | None = None
        self.plans: PlanWatcher | None = None
        self.tracer: ChromeTrace | None = None

    core = None

    def build_core(self) -> None:
        """Build `self.core` around `self.engine.forward`."""

    def loads_mtp(self) -> bool:
        """Whether this instance runs the checkpoint's MTP layer (--speculative mtp)."""
        return self.cfg.speculative == "mtp"

    def load(self) -> control_pb2.InstanceLoad:
        return self.core.load().to_proto()

    async def finish_in_flight(self) -> None:
        await self.core.finish_in_flight()

    async def stop_work(self) -> None:
        """Stop the core's loop (in-flight work has finished or timed out)."""
        await self.core.stop()

    async def setup(self) -> None:
        cfg = self.cfg
        js = self.nc.jetstream()
        model = load_model(cfg.model, experts=no_experts(self.model_cfg), dtype=cfg.dtype,
                           device=cfg.device, mtp=self.loads_mtp())
        if cfg.trace:
            self.tracer = ChromeTrace(cfg.trace, f"{self.role} {self.instance_id}",
                                      cfg.trace_max_events)
        self.engine = EPEngine(model, client=None, tracer=self.tracer)
        self.engine.redo_window_s = cfg.expert_timeout_s  # routing around a lost worker
        self.topology = TopologyFollower(self.engine, await kv_bucket(js, subjects.TOPOLOGY_BUCKET),
                                         cfg.wire, cfg.expert_timeout_s, name=self.instance_id)
        # The scheduler's overlap plan; the engine adopts each new one at its next step.
        self.plans = PlanWatcher(await kv_bucket(js, subjects.PLAN_BUCKET), self.engine.set_plan,
                                 cfg.plan_poll_s)
        self.build_core()

    def heartbeat_fields(self) -> dict:
        return {"load": self.load, "placement_version": lambda: self.topology.placement_version}

    async def until_ready(self) -> None:
        await self.topology.start(self.cfg.topology_wait_s)
        await self.plans.start()
        self.core.start()

    def ready_fields(self) -> dict:
        return {"placement_version": self.topology.placement_version}

    async def stop_core(self) -> None:
        await self.stop_work()
        await self.plans.stop()
        if self.tracer is not None:
            log.info("trace_written", path=str(self.tracer.write()),
                     events=len(self.tracer.events), dropped=self.tracer.dropped)
        await self.topology.close()
