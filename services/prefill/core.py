"""Prefill instance core: batch queued prompts, run them once, sample token 0, hand back KV.

Prompts wait in a bounded FIFO; each step takes as many as fit in `max_batch_tokens` (at least
one) and runs them as one ragged batch. Each result is the first token and the sequence's
latent KV [layers, prompt_len, latent_dim], read out of a cache that lives only for the step.
With a drafter (--speculative mtp) the MTP draft layer then runs over the positions computed
here, and its KV and first draft go with the result, so a speculative decode instance drafts
with the prompt in context from its first step.
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
from services.engine.compute_thread import compute_thread
from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.kv_transfer import DraftKV
from services.engine.sampling import SamplingParams, TokenLogprobs, choose
from services.engine.sequence import Sequence
from services.engine.speculative import DraftInput
from services.model.config import ModelConfig
from services.prefill import metrics
from services.prefill.prefix_reuse import NO_HIT, PrefixReuse

log = structlog.get_logger("prefill")

Forward = Callable[[torch.Tensor, object, list[torch.Tensor]], Awaitable[torch.Tensor]]
# (ids, batch, caches, all_logits=False) -> (each sequence's last logits, every token's hidden)
ForwardTokens = Callable[..., Awaitable[tuple[torch.Tensor, torch.Tensor]]]


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
    draft: DraftKV | None = None  # with a drafter: the MTP layer's KV and first draft


class PrefillCore:
    def __init__(self, cfg: ModelConfig, forward: Forward, dtype: torch.dtype, device,
                 max_batch_tokens: int = 4096, max_queue: int = 256, block_size: int = 64,
                 prefix: PrefixReuse | None = None, chunk_tokens: int = 2048,
                 drafter: Callable[[LatentKVCache], object] | None = None,
                 forward_tokens: ForwardTokens | None = None) -> None:
        """drafter: a function of the step's cache returning an MTPDrafter (with
        forward_tokens, the forward that also returns every token's hidden state)."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if drafter is not None and forward_tokens is None:
            raise ValueError("a drafter needs forward_tokens")
        self.drafter, self.forward_tokens = drafter, forward_tokens
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
                              self.block_size, self.dtype, self.device,
                              draft_layers=1 if self.drafter else 0)
        drafter = self.drafter(cache) if self.drafter else None
        # A cached prefix goes into the step's cache and only the rest is computed; a prompt
        # cached whole still computes its last token (its logits give token 0).
        pasts = [min(hit.tokens, len(j.prompt_ids) - 1) for j, hit in zip(jobs, hits, strict=True)]
        try:
            for job, hit, past in zip(jobs, hits, pasts, strict=True):
                if past > 0:
                    cache.write(job.request_id, hit.latent[:, :past])
            t_forward = time.perf_counter()
            hidden, starts = None, pasts  # the hidden states of positions starts[i] ..
            if len(jobs) == 1 and len(jobs[0].prompt_ids) - pasts[0] > self.chunk_tokens:
                logits, hidden, start = await self._chunked(jobs[0], pasts[0], cache, drafter)
                starts = [start]
            else:
                batch = cache.batch([SeqChunk(j.request_id, past, len(j.prompt_ids) - past)
                                     for j, past in zip(jobs, pasts, strict=True)])
                ids = torch.tensor([t for j, past in zip(jobs, pasts, strict=True)
                                    for t in j.prompt_ids[past:]], dtype=torch.long)
                metrics.BATCH_TOKENS.observe(ids.numel())
                logits, hidden = await self._forward(ids, batch, cache, drafter)
                logits = logits.float().cpu()
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
        sampled = {}
        for job, row in zip(jobs, logits, strict=True):
            if not job.done.done():
                # a migrated request's prompt ends with the tokens generated before: the
                # penalties count them
                generated = job.prompt_ids[len(job.prompt_ids) - job.step_offset:]
                sampled[job.request_id] = choose(row, job.params, job.step_offset, generated)
        drafts = await self._draft(drafter, jobs, pasts, starts, hidden, sampled) \
            if drafter is not None else {}
        for job, hit in zip(jobs, hits, strict=True):
            if job.done.done() or job.request_id not in sampled:
                continue
            token, logprobs = sampled[job.request_id]
            latent = cache.read(job.request_id, len(job.prompt_ids)).cpu()
            metrics.PROMPT_TOKENS.labels(cache="hit").inc(hit.tokens)
            metrics.PROMPT_TOKENS.labels(cache="miss").inc(len(job.prompt_ids) - hit.tokens)
            if self.prefix is not None:
                self.prefix.store_later(job.prompt_ids, latent, job.tenant)
            job.done.set_result(PrefillOutput(token, latent, seconds, cached_tokens=hit.tokens,
                                              first_logprobs=logprobs,
                                              draft=drafts.get(job.request_id)))

    async def _forward(self, ids, batch, cache, drafter):
        """(each sequence's last logits, every token's hidden or None without a drafter)."""
        if drafter is None:
            return await self.forward(ids, batch, cache.layers), None
        return await self.forward_tokens(ids, batch, cache.layers, all_logits=False)

    async def _chunked(self, job: PrefillJob, past: int, cache: LatentKVCache, drafter):
        """Chunked prefill: the prompt from `past` on in pieces of chunk_tokens, each attending
        to the KV of those before it, so a step's attention scores are bounded by chunk_tokens
        x prompt length instead of prompt length squared. Returns the last piece's logits
        (the prompt's), and with a drafter its hidden states and first position (the draft
        layer has run over the pieces before it, whose next tokens are all known)."""
        n, at = len(job.prompt_ids), past
        seq = Sequence(job.request_id, job.prompt_ids, job.params, None, n + 1)
        while True:
            take = min(self.chunk_tokens, n - at)
            batch = cache.batch([SeqChunk(job.request_id, at, take)])
            ids = torch.tensor(job.prompt_ids[at:at + take], dtype=torch.long)
            metrics.BATCH_TOKENS.observe(take)
            logits, hidden = await self._forward(ids, batch, cache, drafter)
            if at + take == n:
                return logits.float().cpu(), hidden, at
            if drafter is not None:
                inputs = [DraftInput(seq, at, job.prompt_ids[at + 1:at + take + 1], hidden)]
                await compute_thread().call(drafter.propose, inputs)
            at += take

    async def _draft(self, drafter, jobs, pasts, starts, hidden, sampled) -> dict[str, DraftKV]:
        """The draft layer over each prompt's positions from starts[i] (the hidden rows laid
        end to end), each followed by the next prompt token and the last by token 0; its KV
        from pasts[i] on and first draft, per request."""
        inputs, at = [], 0
        for job, start in zip(jobs, starts, strict=True):
            rows = len(job.prompt_ids) - start
            if job.request_id in sampled:
                seq = Sequence(job.request_id, job.prompt_ids, job.params, None,
                               len(job.prompt_ids) + 1)
                tokens = job.prompt_ids[start + 1:] + [sampled[job.request_id][0]]
                inputs.append(DraftInput(seq, start, tokens, hidden[at:at + rows]))
            at += rows
        if not inputs:
            return {}
        first = await compute_thread().call(drafter.propose, inputs)
        past = {j.request_id: p for j, p in zip(jobs, pasts, strict=True)}
        return {i.seq.request_id: DraftKV(
                    cache_draft(drafter, i.seq.request_id, past[i.seq.request_id],
                                len(i.seq.prompt_ids)), past[i.seq.request_id], token)
                for i, token in zip(inputs, first, strict=True)}

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


def cache_draft(drafter, seq_id: str, start: int, stop: int) -> torch.Tensor:
    """The draft layer's KV of positions [start, stop) out of the drafter's cache."""
    return drafter.cache.read_draft(seq_id, start, stop).cpu()
