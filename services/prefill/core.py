"""Prefill instance core: batch queued prompts, run them once, sample token 0, hand back KV.

Prompts wait in a bounded FIFO; each step takes as many as fit in `max_batch_tokens` (at least
one) and runs them as one ragged batch. Each result is the first token and the sequence's
latent KV [layers, prompt_len, latent_dim], read out of a cache that lives only for the step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import torch

from services.common.load import InstanceLoad
from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.sampling import SamplingParams, TokenLogprobs, choose
from services.model.config import ModelConfig
from services.prefill import metrics
from services.prefill.prefix_reuse import NO_HIT, PrefixReuse

log = structlog.get_logger("prefill")

Forward = Callable[[torch.Tensor, object, list[torch.Tensor]], Awaitable[torch.Tensor]]


class QueueFull(Exception):
    pass


@dataclass
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    done: asyncio.Future
    step_offset: int = 0
    tenant: str = ""  # the prefix-cache namespace's tenant
    queued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PrefillOutput:
    first_token: int
    latent: torch.Tensor
    seconds: float
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    first_logprobs: TokenLogprobs | None = None  # when the request asked for logprobs


class PrefillCore:
    def __init__(self, cfg: ModelConfig, forward: Forward, dtype: torch.dtype, device,
                 max_batch_tokens: int = 4096, max_queue: int = 256, block_size: int = 64,
                 prefix: PrefixReuse | None = None, chunk_tokens: int = 2048) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.cfg, self.forward, self.dtype, self.device = cfg, forward, dtype, device
        self.prefix, self.chunk_tokens = prefix, chunk_tokens
        self.max_batch_tokens, self.max_queue, self.block_size = max_batch_tokens, max_queue, block_size
        self.queue: deque[PrefillJob] = deque()
        self.running: list[PrefillJob] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.draining = False
        self.batches = 0

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     step_offset: int = 0, tenant: str = "") -> PrefillOutput:
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"prefill queue full ({self.max_queue} prompts waiting)")
        job = PrefillJob(request_id, list(prompt_ids), params,
                         asyncio.get_running_loop().create_future(), step_offset=step_offset,
                         tenant=tenant)
        self.queue.append(job)
        self._wake.set()
        return await job.done

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def _take_batch(self) -> list[PrefillJob]:
        """Queued prompts up to max_batch_tokens; a prompt longer than chunk_tokens runs alone,
        in chunks."""
        batch, tokens = [], 0
        while self.queue:
            n = len(self.queue[0].prompt_ids)
            if batch and (tokens + n > self.max_batch_tokens or n > self.chunk_tokens):
                break
            job = self.queue.popleft()
            if job.done.cancelled():
                continue
            batch.append(job)
            tokens += n
            if n > self.chunk_tokens:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.running = self._take_batch()
            if self.running:
                await self._run(self.running)
            self.running = []
            await asyncio.sleep(0)

    async def _run(self, jobs: list[PrefillJob]) -> None:
        t0 = time.perf_counter()
        hits = [await self.prefix.lookup(j.prompt_ids, j.tenant) if self.prefix else NO_HIT
                for j in jobs]
        blocks = sum(-(-len(j.prompt_ids) // self.block_size) for j in jobs)
        cache = LatentKVCache(self.cfg.num_hidden_layers, self.cfg.latent_dim, blocks,
                              self.block_size, self.dtype, self.device)
        # A cached prefix goes into the step's cache and only the rest is computed; a prompt
        # cached whole still computes its last token (its logits give token 0).
        pasts = [min(hit.tokens, len(j.prompt_ids) - 1) for j, hit in zip(jobs, hits, strict=True)]
        try:
            for job, hit, past in zip(jobs, hits, pasts, strict=True):
                if past > 0:
                    cache.write(job.request_id, hit.latent[:, :past])
            t_forward = time.perf_counter()
            if len(jobs) == 1 and len(jobs[0].prompt_ids) - pasts[0] > self.chunk_tokens:
                logits = await self._chunked(jobs[0], pasts[0], cache)
            else:
                batch = cache.batch([SeqChunk(j.request_id, past, len(j.prompt_ids) - past)
                                     for j, past in zip(jobs, pasts, strict=True)])
                ids = torch.tensor([t for j, past in zip(jobs, pasts, strict=True)
                                    for t in j.prompt_ids[past:]], dtype=torch.long)
                metrics.BATCH_TOKENS.observe(ids.numel())
                logits = (await self.forward(ids, batch, cache.layers)).float().cpu()
        except Exception as exc:
            log.error("prefill_batch_failed", error=str(exc), requests=len(jobs))
            for j in jobs:
                if not j.done.done():
                    j.done.set_exception(exc)
            return
        seconds = time.perf_counter() - t0
        self.batches += 1
        if self.prefix is not None:
            computed = sum(len(j.prompt_ids) - past for j, past in zip(jobs, pasts, strict=True))
            self.prefix.observe_prefill(computed, time.perf_counter() - t_forward)
        for job, hit, row in zip(jobs, hits, logits, strict=True):
            if job.done.done():
                continue
            # a migrated request's prompt ends with the tokens generated before: the penalties
            # count them
            generated = job.prompt_ids[len(job.prompt_ids) - job.step_offset:]
            token, logprobs = choose(row, job.params, job.step_offset, generated)
            latent = cache.read(job.request_id, len(job.prompt_ids)).cpu()
            metrics.PROMPT_TOKENS.labels(cache="hit").inc(hit.tokens)
            metrics.PROMPT_TOKENS.labels(cache="miss").inc(len(job.prompt_ids) - hit.tokens)
            if self.prefix is not None:
                self.prefix.store_later(job.prompt_ids, latent, job.tenant)
            job.done.set_result(PrefillOutput(token, latent, seconds, cached_tokens=hit.tokens,
                                              first_logprobs=logprobs))

    async def _chunked(self, job: PrefillJob, past: int, cache: LatentKVCache) -> torch.Tensor:
        """Chunked prefill: the prompt from `past` on in pieces of chunk_tokens, each attending
        to the KV of those before it, so a step's attention scores are bounded by chunk_tokens
        x prompt length instead of prompt length squared. The last piece's logits are the
        prompt's."""
        n, at = len(job.prompt_ids), past
        while True:
            take = min(self.chunk_tokens, n - at)
            batch = cache.batch([SeqChunk(job.request_id, at, take)])
            ids = torch.tensor(job.prompt_ids[at:at + take], dtype=torch.long)
            metrics.BATCH_TOKENS.observe(take)
            logits = await self.forward(ids, batch, cache.layers)
            at += take
            if at == n:
                return logits.float().cpu()

    def load(self) -> InstanceLoad:
        jobs = list(self.queue) + self.running
        return InstanceLoad(queued_requests=len(jobs),
                            queued_tokens=sum(len(j.prompt_ids) for j in jobs),
                            attention_cost=float(sum(len(j.prompt_ids) ** 2 for j in jobs)))

    async def finish_in_flight(self, poll_s: float = 0.05) -> None:
        self.draining = True
        while self.queue or self.running:
            await asyncio.sleep(poll_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
