"""The expert-parallel engine: attention, dense layers, gate and shared expert run here;
routed experts run on expert-worker processes reached through an ExpertClient.

It drives the same GenerationLoop as the reference engine, so the schedule is identical; only
where the routed experts run differs. This is the engine the prefill and decode services use.
A step runs as one micro-batch or as two that overlap dispatch with compute, as the overlap
plan says (services/engine/overlap.py); torch work runs on the process's compute thread.
"""

from __future__ import annotations

import asyncio
import time

import structlog
import torch
from prometheus_client import Counter, Gauge, Histogram

from services.engine.ep_client import ExpertClient
from services.engine.microbatch import OverlapSettings
from services.engine.overlap import ForwardStats, overlapped_forward
from services.engine.reference import Completion, EngineStats, GenerationLoop, GenerationRequest
from services.engine.trace import ChromeTrace
from services.model.batch import AttentionBatch
from services.model.deepseek import DeepseekModel

# One forward over a batch on this attention instance (prefill batch or decode step),
# dispatches included; bench/bench_cluster.py subtracts epserve_ep_dispatch_seconds from it.
FORWARD_SECONDS = Histogram("epserve_ep_forward_seconds", "one EP forward over a batch",
                            buckets=(1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
COMPUTE_SECONDS = Counter("epserve_ep_compute_seconds",
                          "compute-thread busy time of EP forwards (every torch op of a step)")
SPLIT_STEPS = Counter("epserve_ep_split_steps", "EP forwards run as two micro-batches")
PLAN_VERSION = Gauge("epserve_ep_overlap_plan_version", "overlap plan version in use")
log = structlog.get_logger("ep_engine")


class EPEngine:
    """`plan` (an OverlapPlan proto or OverlapSettings: micro_batches, split_policy,
    min_batch_tokens, version) decides one or two micro-batches per step; whoever owns the
    engine may replace it at any time (services/attention/plan_watch.py does, from NATS), and
    forward() reads it once at its start, so a new plan takes effect at a step boundary.
    `tracer` (a ChromeTrace) records every op of every step when set."""

    def __init__(self, model: DeepseekModel, client: ExpertClient, block_size: int = 64,
                 record_logits: bool = False, plan=None, tracer: ChromeTrace | None = None) -> None:
        self.model, self.client = model, client
        self.cfg = model.cfg
        self.block_size, self.record_logits = block_size, record_logits
        self.stats = EngineStats()
        self.plan = plan if plan is not None else OverlapSettings()
        self.tracer = tracer
        self.last_forward: ForwardStats | None = None
        self.plan_version_in_use: int | None = None
        self._flushing: asyncio.Future | None = None

    async def forward(self, input_ids: torch.Tensor, batch: AttentionBatch,
                      caches: list[torch.Tensor], micro_batch: int = 0,
                      step_id: int | None = None) -> torch.Tensor:
        """One step over the batch: logits [B, V] of each sequence's last token."""
        t0 = time.perf_counter()
        plan = self.plan  # read once: a plan change applies from the next step on
        client = self.client  # likewise a topology switch (EPInstance swaps the client)
        version = int(getattr(plan, "version", 0))
        if version != self.plan_version_in_use:
            log.info("overlap_plan_in_use", version=version, micro_batches=plan.micro_batches,
                     split_policy=plan.split_policy, min_batch_tokens=plan.min_batch_tokens)
            self.plan_version_in_use = version
            PLAN_VERSION.set(version)
        step_id = client.new_step() if step_id is None else step_id
        logits, self.last_forward = await overlapped_forward(
            self.model, client, input_ids, batch, caches, plan, step_id, self.tracer, micro_batch)
        FORWARD_SECONDS.observe(time.perf_counter() - t0)
        COMPUTE_SECONDS.inc(self.last_forward.compute_s)
        if self.last_forward.micro_batches > 1:
            SPLIT_STEPS.inc()
        if self.tracer is not None and self.tracer.due() and (
                self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().run_in_executor(None, self.tracer.write)
        return logits

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        loop = GenerationLoop(self.cfg, requests, self.block_size, self.model.dtype,
                              self.model.device, self.record_logits, self.stats)
        while (step := loop.next_step()) is not None:
            loop.consume(step, await self.forward(step.input_ids, step.batch, loop.cache.layers))
        return loop.completions()
