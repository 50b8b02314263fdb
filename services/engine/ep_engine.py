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
from collections.abc import Awaitable, Callable

import structlog
import torch
from prometheus_client import Counter, Gauge, Histogram

from services.engine.compute_thread import compute_thread
from services.engine.ep_client import EPError, ExpertClient
from services.engine.microbatch import OverlapSettings, wants_split
from services.engine.overlap import ForwardStats, OverlappedStep
from services.engine.overlap_tuner import OverlapTuner
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
REDONE_STEPS = Counter("epserve_ep_redone_steps", "EP steps redone after a failure, by reason",
                       ["reason"])
TUNED_SINGLE_STEPS = Counter(
    "epserve_ep_tuned_single_steps",
    "EP forwards the plan would split that ran as one micro-batch, as the overlap tuner chose")
PLAN_VERSION = Gauge("epserve_ep_overlap_plan_version", "overlap plan version in use")
log = structlog.get_logger("ep_engine")


class EPEngine:
    """`plan` (an OverlapPlan proto or OverlapSettings: micro_batches, split_policy,
    min_batch_tokens, version) decides one or two micro-batches per step; whoever owns the
    engine may replace it at any time (`set_plan`; services/attention/plan_watch.py does, from
    NATS), and forward() reads it once at its start, so a new plan takes effect at a step
    boundary. Likewise `switch_client` hands over a client for a new expert topology, adopted
    at the next step boundary. `tracer` (a ChromeTrace) records every op of every step when set.
    Unless the plan is `fixed`, a step the plan would split runs as one or two micro-batches as
    `tuner` (an OverlapTuner fed this engine's own step times) finds faster for its size.

    `on_stale_placement`, when set, is asked for a newer client after a worker refused a step
    as FAILED_PRECONDITION (its placement version is gone); the step is then redone on it.
    Redoing is safe: a step rewrites the same KV positions with the same values."""

    def __init__(self, model: DeepseekModel, client: ExpertClient | None, block_size: int = 64,
                 record_logits: bool = False, plan=None, tracer: ChromeTrace | None = None) -> None:
        self.model, self.client = model, client
        self.cfg = model.cfg
        self.block_size, self.record_logits = block_size, record_logits
        self.stats = EngineStats()
        self.plan = plan if plan is not None else OverlapSettings()
        self.tracer = tracer
        self.tuner = OverlapTuner()
        # one micro-batch: send each dispatch, then compute the shared expert while it travels
        # (False: the reference order, shared expert first; benchmarks compare the two)
        self.single_batch_overlap = True
        self.last_forward: ForwardStats | None = None
        self.plan_version_in_use: int | None = None
        self.on_stale_placement: Callable[[], Awaitable[ExpertClient | None]] | None = None
        self.redo_window_s = client.timeout_s if client is not None else 30.0
        self._next_client: ExpertClient | None = None
        self._flushing: asyncio.Future | None = None

    def set_plan(self, plan) -> None:
        self.plan = plan

    def switch_client(self, client: ExpertClient) -> None:
        """Use `client` from the next step on (a client handed over earlier and not yet in
        use is closed)."""
        unused, self._next_client = self._next_client, client
        if unused is not None:
            asyncio.get_running_loop().create_task(unused.close())

    async def _adopt_next_client(self) -> None:
        old, self.client, self._next_client = self.client, self._next_client, None
        if old is not None:
            await old.close()

    async def forward(self, input_ids: torch.Tensor, batch: AttentionBatch,
                      caches: list[torch.Tensor], micro_batch: int = 0,
                      step_id: int | None = None) -> torch.Tensor:
        """One step over the batch: logits [B, V] of each sequence's last token."""
        return await self._forward(input_ids, batch, caches, micro_batch, step_id, "last")

    async def forward_tokens(self, input_ids: torch.Tensor, batch: AttentionBatch,
                             caches: list[torch.Tensor], all_logits: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: every token's logits [T, V] (all_logits=False: each sequence's last) and
        every token's final-normed hidden [T, H], as DeepseekModel.forward_tokens."""
        return await self._forward(input_ids, batch, caches, 0, None,
                                   "tokens" if all_logits else "last+hidden")

    async def _forward(self, input_ids, batch, caches, micro_batch, step_id, outputs):
        """A step that failed because an expert worker died or stalled is redone (the client now
        routes around that worker), for up to `redo_window_s`; when an expert has no live
        replica the redo waits for a worker to come back or a new topology. Redoing is safe:
        a step rewrites the same KV positions with the same values."""
        if self._next_client is not None:
            await self._adopt_next_client()
        if self.client is None:
            raise EPError("no expert topology yet", "UNAVAILABLE")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.redo_window_s
        while True:
            try:
                return await self._step(input_ids, batch, caches, micro_batch, step_id,
                                        outputs)
            except EPError as exc:
                step_id = None  # a redone step gets a fresh id
                left = give_up - loop.time()
                if exc.code == "FAILED_PRECONDITION" and self.on_stale_placement is not None:
                    client = await self.on_stale_placement()
                    if client is None:
                        raise
                    await self._adopt_next_client()
                    REDONE_STEPS.labels(reason="stale_placement").inc()
                    log.info("ep_step_redone_on_new_placement", version=client.table.version)
                    continue
                if not exc.worker_failed or left <= 0:
                    raise
                reason = "no_live_replica" if exc.no_live_replica else "worker_failed"
                REDONE_STEPS.labels(reason=reason).inc()
                log.warning("ep_step_redone", reason=reason, error=str(exc),
                            down=sorted(self.client.down))
                if exc.no_live_replica:  # wait for a worker to come back or a new topology
                    await self.client.wait_for_change(min(left, 1.0))
                if self._next_client is not None:
                    await self._adopt_next_client()

    async def _step(self, input_ids, batch, caches, micro_batch, step_id, outputs):
        t0 = time.perf_counter()
        plan, client = self.plan, self.client  # read once: changes apply from the next step
        version = int(getattr(plan, "version", 0))
        if version != self.plan_version_in_use:
            log.info("overlap_plan_in_use", version=version, micro_batches=plan.micro_batches,
                     split_policy=plan.split_policy, min_batch_tokens=plan.min_batch_tokens,
                     fixed=plan.fixed)
            self.plan_version_in_use = version
            PLAN_VERSION.set(version)
        step_id = client.new_step() if step_id is None else step_id
        phase = "decode" if batch.is_decode else "prefill"
        tuned = wants_split(batch.num_tokens, plan) and not plan.fixed
        run_plan = plan
        if tuned:
            self.tuner.reset_for(version)
            if self.tuner.choose(phase, batch.num_tokens) == 1:
                run_plan = OverlapSettings(micro_batches=1, split_policy=plan.split_policy,
                                           min_batch_tokens=plan.min_batch_tokens,
                                           version=version)
                TUNED_SINGLE_STEPS.inc()
        logits, self.last_forward = await OverlappedStep(
            self.model, client, input_ids, batch, caches, step_id, self.tracer, outputs,
            self.single_batch_overlap).run(
                run_plan, micro_batch)
        if tuned:
            self.tuner.record(phase, batch.num_tokens, self.last_forward.micro_batches,
                              self.last_forward.wall_s)
        FORWARD_SECONDS.observe(time.perf_counter() - t0)
        COMPUTE_SECONDS.inc(self.last_forward.compute_s)
        if self.last_forward.micro_batches > 1:
            SPLIT_STEPS.inc()
        if self.tracer is not None and self.tracer.due() and (
                self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().run_in_executor(None, self.tracer.write)
        return logits

    async def close(self) -> None:
        for client in (self._next_client, self.client):
            if client is not None:
                await client.close()
        self.client = self._next_client = None

    async def generate(self, requests: list[GenerationRequest], tokenizer=None, drafter=None
                       ) -> list[Completion]:
        """As ReferenceEngine.generate (a tokenizer gives completions' text and stop strings;
        drafter: speculative decoding, as ReferenceEngine's). The draft runs on the compute
        thread."""
        loop = GenerationLoop(self.cfg, requests, self.block_size, self.model.dtype,
                              self.model.device, self.record_logits, self.stats, tokenizer,
                              drafter)
        while (step := loop.next_step()) is not None:
            args, kind = (step.input_ids, step.batch, loop.cache.layers), loop.outputs
            output = await (self.forward(*args) if kind == "last" else
                            self.forward_tokens(*args, all_logits=kind == "tokens"))
            await compute_thread().call(loop.consume, step, output)
        return loop.completions()
