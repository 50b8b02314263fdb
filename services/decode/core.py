"""Decode instance core: KV reservations, latent-KV install, continuous batching.

Requests join and leave the running batch at every step. Each request has an event queue the
server drains into its gRPC stream: ("token", seq, id) ... then ("finished", reason, count).
Token seq 0 is the first token, sampled by the prefill instance and handed over with the KV.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import torch

from services.common.errors import StatusError
from services.common.load import InstanceLoad
from services.decode import metrics
from services.engine.compute_thread import compute_thread
from services.engine.kv_budget import KVBudget, NeverFits
from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.kv_transfer import DraftKV
from services.engine.sampling import SamplingParams, TokenLogprobs
from services.engine.sequence import Sequence
from services.engine.speculative import Speculation
from services.model.config import ModelConfig

log = structlog.get_logger("decode")

Forward = Callable[[torch.Tensor, object, list[torch.Tensor]], Awaitable[torch.Tensor]]
# every token's (logits, hidden): speculative decoding's verification step
ForwardTokens = Callable[[torch.Tensor, object, list[torch.Tensor]],
                         Awaitable[tuple[torch.Tensor, torch.Tensor]]]


class Rejected(StatusError):
    """The decode instance refuses a request or its KV (full, draining, unknown, malformed)."""


@dataclass
class DecodeSlot:
    seq: Sequence
    blocks: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    kv_ready: bool = False
    emitted: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def request_id(self) -> str:
        return self.seq.request_id


class DecodeCore:
    def __init__(self, cfg: ModelConfig, forward: Forward, cache: LatentKVCache,
                 max_batch: int = 64, admission_wait_s: float = 30.0,
                 speculation: Speculation | None = None,
                 forward_tokens: ForwardTokens | None = None) -> None:
        """speculation (with forward_tokens): speculative decoding, each step verifying the
        drafts of the last (services/engine/speculative.py); the output is unchanged."""
        if speculation is not None and forward_tokens is None:
            raise ValueError("speculative decoding needs forward_tokens")
        self.cfg, self.forward, self.cache = cfg, forward, cache
        self.speculation, self.forward_tokens = speculation, forward_tokens
        self.budget = KVBudget(cache.allocator.num_blocks, cache.allocator.block_size)
        self.max_batch, self.admission_wait_s = max_batch, admission_wait_s
        self.slots: dict[str, DecodeSlot] = {}
        self._waiting: set[str] = set()  # ids whose admit() still waits for KV room
        self.draining = False
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.last_batch = 0
        self._in_step: set[str] = set()  # the sequences of the step in flight
        self._deferred_free: list[str] = []  # released during it: freed when it is over

    # ---- admission ------------------------------------------------------------------------
    async def admit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    step_offset: int = 0) -> DecodeSlot:
        if self.draining:
            raise Rejected("UNAVAILABLE", "decode instance is draining")
        if request_id in self.slots or request_id in self._waiting \
                or self.budget.holds(request_id):  # (a cancel waiting for its step to end)
            raise Rejected("ALREADY_EXISTS", f"request {request_id} is already here")
        blocks = self.budget.blocks_needed(len(prompt_ids), params.max_tokens,
                                           self.cfg.max_position_embeddings)
        self._waiting.add(request_id)
        try:
            async with self._room:
                ok = await asyncio.wait_for(self._room.wait_for(
                    lambda: self.budget.try_reserve(request_id, blocks)), self.admission_wait_s)
        except NeverFits as exc:
            raise Rejected("RESOURCE_EXHAUSTED", str(exc)) from exc
        except TimeoutError as exc:
            raise Rejected("RESOURCE_EXHAUSTED",
                           f"KV cache full: {blocks} blocks not free within "
                           f"{self.admission_wait_s}s") from exc
        finally:
            self._waiting.discard(request_id)
        assert ok
        seq = Sequence(request_id, list(prompt_ids), params, self.cfg.eos_token_id,
                       self.cfg.max_position_embeddings, step_offset=step_offset)
        slot = DecodeSlot(seq, blocks)
        self.slots[request_id] = slot
        log.info("decode_admitted", request_id=request_id, blocks=blocks,
                 free_blocks=self.budget.free_blocks)
        return slot

    # ---- KV hand-over from prefill ----------------------------------------------------------
    def install_kv(self, request_id: str, latent: torch.Tensor, first_token: int,
                   first_logprobs: TokenLogprobs | None = None, draft: DraftKV | None = None
                   ) -> None:
        """draft: the MTP layer's KV of the prompt and first draft, from a prefill that ran it
        (used when this instance decodes speculatively, else ignored)."""
        slot = self.slots.get(request_id)
        if slot is None:
            raise Rejected("NOT_FOUND", f"no reservation for request {request_id}")
        if slot.kv_ready:  # a re-driven prefill of a transfer that did arrive: nothing to do
            raise Rejected("ALREADY_EXISTS", f"request {request_id} already has its KV")
        want = (self.cfg.num_hidden_layers, len(slot.seq.prompt_ids), self.cfg.latent_dim)
        if tuple(latent.shape) != want:
            raise Rejected("INVALID_ARGUMENT",
                           f"KV of shape {list(latent.shape)}, expected {list(want)}")
        if not 0 <= first_token < self.cfg.vocab_size:
            raise Rejected("INVALID_ARGUMENT", f"first token {first_token} outside the vocab")
        if slot.seq.params.logprobs is not None and first_logprobs is None:
            raise Rejected("INVALID_ARGUMENT", "the request asks for logprobs and the transfer "
                                               "carries none for its first token")
        if draft is not None and self.speculation is not None:
            self._check_draft(draft, len(slot.seq.prompt_ids))
        self.cache.write(request_id, latent)
        if draft is not None and self.speculation is not None:
            self.cache.write_draft(request_id, draft.start, draft.latent)
            self.speculation.adopt(request_id, draft.start, draft.first_draft)
            metrics.DRAFT_KV.inc()
        slot.kv_ready = True
        self._append(slot, first_token, first_logprobs)
        self._wake.set()

    def _check_draft(self, draft: DraftKV, prompt_len: int) -> None:
        want = (1, prompt_len - draft.start, self.cfg.latent_dim)
        if not 0 <= draft.start < prompt_len or tuple(draft.latent.shape) != want:
            raise Rejected("INVALID_ARGUMENT", f"draft KV of shape {list(draft.latent.shape)} "
                                               f"from position {draft.start}, expected {list(want)}")
        if not 0 <= draft.first_draft < self.cfg.vocab_size:
            raise Rejected("INVALID_ARGUMENT", f"first draft {draft.first_draft} outside the vocab")

    # ---- the batch loop ---------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def running(self) -> list[DecodeSlot]:
        return [s for s in self.slots.values() if s.kv_ready and not s.seq.finished]

    async def _loop(self) -> None:
        while True:
            batch_slots = self.running()[: self.max_batch]
            if not batch_slots:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step(batch_slots)
            except Exception as exc:  # a failed step fails its requests loudly, not silently
                log.error("decode_step_failed", error=str(exc), requests=len(batch_slots))
                # An expert-parallel failure the engine could not route around is UNAVAILABLE
                # (the router moves the request elsewhere); anything else is a bug: INTERNAL.
                code = exc.code if isinstance(exc, StatusError) else "INTERNAL"
                for s in batch_slots:
                    self._fail(s, code, str(exc))
            await asyncio.sleep(0)  # let new arrivals and stream writers run between steps

    async def _step(self, batch_slots: list[DecodeSlot]) -> None:
        if self.speculation is not None:
            plan = self.speculation.plan([s.seq for s in batch_slots])
            batch = (plan, self.cache.batch(plan.chunks, speculative=True))
        else:
            batch = self.cache.batch([SeqChunk(s.request_id, s.seq.cache_len, 1)
                                      for s in batch_slots])
        # This step will write KV into these sequences' blocks: a sequence cancelled while it
        # runs keeps its blocks (and its reservation) until the step is over, or the blocks
        # could already belong to a request installed meanwhile.
        self._in_step = {s.request_id for s in batch_slots}
        try:
            await self._run_step(batch_slots, batch)
        finally:
            self._in_step = set()
            for request_id in self._deferred_free:
                self._free(request_id)
            self._deferred_free.clear()

    async def _run_step(self, batch_slots: list[DecodeSlot], batch) -> None:
        metrics.BATCH.observe(len(batch_slots))
        if self.speculation is not None:
            await self._run_speculative_step(batch_slots, batch)
            return
        ids = torch.tensor([s.seq.output_ids[-1] for s in batch_slots], dtype=torch.long)
        logits = (await self.forward(ids, batch, self.cache.layers)).float().cpu()
        self.steps += 1
        self.last_batch = len(batch_slots)
        for slot, row in zip(batch_slots, logits, strict=True):
            if slot.request_id in self.slots and not slot.seq.finished:
                self._append(slot, *slot.seq.sample(row))

    async def _run_speculative_step(self, batch_slots: list[DecodeSlot], planned) -> None:
        plan, batch = planned
        logits, hidden = await self.forward_tokens(plan.input_ids, batch, self.cache.layers)
        self.steps += 1
        self.last_batch = len(batch_slots)
        slots = {s.request_id: s for s in batch_slots}

        def append(seq: Sequence, token: int, logprobs, _row) -> bool:
            slot = slots[seq.request_id]
            if slot.request_id not in self.slots or seq.finished:
                return False  # cancelled while the step ran
            self._append(slot, token, logprobs)
            return True

        stats = self.speculation.stats
        proposed, accepted = stats.proposed[0], stats.accepted[0]
        inputs = self.speculation.settle(plan, logits.float().cpu(), hidden, append)
        metrics.DRAFT_TOKENS.labels(position="1").inc(stats.proposed[0] - proposed)
        metrics.ACCEPTED_TOKENS.labels(position="1").inc(stats.accepted[0] - accepted)
        await compute_thread().call(self.speculation.draft, inputs)

    def _append(self, slot: DecodeSlot, token: int, logprobs: TokenLogprobs | None = None
                ) -> None:
        """A token for the stream (its logprobs, when asked for, at seq.logprobs[index])."""
        slot.seq.append(token, logprobs if slot.seq.params.logprobs is not None else None)
        slot.events.put_nowait(("token", slot.emitted, token))
        slot.emitted += 1
        if slot.seq.finished:
            slot.events.put_nowait(("finished", slot.seq.finish_reason, len(slot.seq.output_ids)))
            self._release(slot)

    def _fail(self, slot: DecodeSlot, code: str, message: str) -> None:
        slot.events.put_nowait(("error", code, message))
        self._release(slot)

    def _release(self, slot: DecodeSlot) -> None:
        if self.slots.pop(slot.request_id, None) is None:
            return
        if slot.request_id in self._in_step:
            self._deferred_free.append(slot.request_id)
        else:
            self._free(slot.request_id)

    def _free(self, request_id: str) -> None:
        self.cache.free(request_id)
        if self.speculation is not None:
            self.speculation.forget(request_id)
        self.budget.release(request_id)
        asyncio.get_running_loop().create_task(self._notify_room())

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    def cancel(self, request_id: str) -> None:
        """Client went away or the router gave up: free the slot now."""
        slot = self.slots.get(request_id)
        if slot is not None:
            slot.seq.finish_reason = slot.seq.finish_reason or "abort"
            log.info("decode_cancelled", request_id=request_id, tokens=len(slot.seq.output_ids))
            self._release(slot)

    # ---- state for heartbeats, metrics and drain ---------------------------------------------
    def load(self) -> InstanceLoad:
        # A sequence cancelled mid-step still holds its reservation until the step is over, so
        # it counts as running until then: the two figures always describe the same requests.
        return InstanceLoad(running_requests=len(self.slots) + len(self._deferred_free),
                            kv_blocks_in_use=self.budget.reserved_blocks,
                            kv_blocks_total=self.budget.total_blocks,
                            kv_block_size=self.budget.block_size,
                            queued_requests=len(self._waiting))

    async def finish_in_flight(self, poll_s: float = 0.05) -> None:
        self.draining = True
        while self.slots:
            await asyncio.sleep(poll_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
