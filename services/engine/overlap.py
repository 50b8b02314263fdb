"""One EP forward step, as one micro-batch or as two that overlap communication with compute.

Every torch op runs on the process's single compute thread (`compute_thread.py`): one thread
keeps the ops in submission order, torch releases the GIL inside its kernels, and the event
loop stays free to move gRPC traffic (dispatches, replies, heartbeats) while compute runs. A
one-micro-batch step's hops may run on the event loop instead, when short (compute_thread.py
says when): with nothing to overlap, the hand-over is only a cost.

Each micro-batch is a coroutine walking the layers. Its ops, per layer, are the model's own
public stages (DecoderLayer, services/model/deepseek.py, whose docstring says what each
computes; no layer math is written here), traced under these names:
  ATTN-0   layer.attn0
  ATTN-1   layer.attn1 (for a MoE layer it ends with the gate)
  FFN      (dense layer) layer.dense_ffn
  DISPATCH (MoE layer) the routed experts on the expert workers: ExpertClient.start_dispatch
           then PendingDispatch.result(), on the event loop, asynchronous; traced on the
           micro-batch's communication track as DISPATCH (send), MLP (the last-replying
           worker's compute) and COMBINE (decoding and adding the replies)
  SHARED   layer.shared_expert
  COMBINE  layer.combine (residual + routed + shared), once the replies are back.
A "hop" is one hand-over to the compute thread. One hop runs everything up to the next
dispatch (the last MoE layer's COMBINE, then ATTN-0/ATTN-1/FFN of dense layers and ATTN-0/
ATTN-1 + gate of the next MoE layer); then the dispatch goes out, and SHARED is a hop of its
own, computed while the micro-batch's own dispatch is in flight. Few hops matter on a loaded
CPU, where every thread hand-over may wait for a core; the trace still shows every op.

With two micro-batches the coroutines run concurrently, so while micro-batch 0's dispatch is on
the wire and in the workers, the compute thread runs micro-batch 1's ATTN-0/ATTN-1/SHARED and
vice versa, layer after layer, with no barrier between layers. The compute thread's FIFO sets
the interleaving, which comes out as DeepSeek's: ATTN(0) | ATTN(1) + DISPATCH(0) in flight |
SHARED(0) | SHARED(1) + DISPATCH(1) in flight | COMBINE(0) ATTN(0, next layer) | ... (the
prefill alternation; in decode the same 5 stages ATTN-0, ATTN-1, DISPATCH, SHARED, COMBINE per
micro-batch, the other micro-batch's stages filling each one's wait).

Ordering rule for a prompt split across the micro-batches: micro-batch 1's attention at layer L
reads latent KV that micro-batch 0's ATTN-0 wrote at layer L, so micro-batch 1 submits its k-th
attention hop only after micro-batch 0's k-th attention hop has run (micro-batch 0 never waits
for micro-batch 1, so this cannot deadlock). Without a split prompt nothing waits.

With two micro-batches, EMBED and the leading dense layers run once on the whole step before
the split (`_dense_prefix`): no dispatch precedes the first MoE layer, so halves would only
cost more.

With one micro-batch, by default the dispatch goes first and SHARED is computed while it
travels (single-batch overlap: the shared expert hides up to its own time of each round trip,
with no split and no extra per-op cost); `single_batch_overlap=False` keeps the reference
order, SHARED in the attention hop before the dispatch, then the wait for the replies.

Numerics: every op is row-wise except attention, which is per sequence, so the two
micro-batches compute the same function as the whole batch; the attention path (absorbed for a
decode step, expanded otherwise) is chosen by the whole step, never by a micro-batch (attn1's
decode_step is the step's).

Limits: the dispatch itself (routing, encoding, protobuf) runs on the event loop in Python, so
it holds the GIL and cannot overlap Python-bound compute; on small models every op is
per-call-overhead bound, so two micro-batches cost nearly twice the ops of one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from services.engine.compute_thread import compute_thread
from services.engine.microbatch import MicroBatch, micro_batches, plan_cut
from services.engine.overlap_tuner import size_bucket
from services.engine.trace import COMPUTE, STEPS, ChromeTrace, comm_track
from services.model.batch import AttentionBatch


@dataclass(frozen=True)
class ForwardStats:
    """One forward: wall time, compute-thread busy time, and how it was split."""

    step_id: int
    phase: str  # "prefill" | "decode"
    tokens: int
    micro_batches: int
    cut: int | None
    plan_version: int
    wall_s: float
    compute_s: float

    @property
    def waiting_s(self) -> float:
        """Wall time the compute thread was not busy for this step (exposed communication,
        remote experts and scheduling overhead)."""
        return max(self.wall_s - self.compute_s, 0.0)


class _Clock:
    """Runs ops on the compute thread and notes (name, layer, t0, t1) for each."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, int, float, float]] = []

    def __call__(self, name: str, layer: int, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.spans.append((name, layer, t0, time.perf_counter()))
        return out


@dataclass
class _Carry:
    """A micro-batch's state between compute-thread hops."""

    h: torch.Tensor | None = None
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    next_layer: int = 0
    pending: tuple | None = None  # (routed, shared, dtype) of the last MoE layer, to combine
    x: torch.Tensor | None = None  # the current MoE layer's normed input, gate output
    weights: torch.Tensor | None = None
    ids: torch.Tensor | None = None


OUTPUTS = ("last", "tokens", "last+hidden")

# ---- the step --------------------------------------------------------------------------------

class OverlappedStep:
    """Per micro-batch, one compute-thread hop runs everything up to the next dispatch
    (COMBINE of the last MoE layer, then ATTN-0 / ATTN-1 / FFN of dense layers and ATTN-0 /
    ATTN-1 + gate of the next MoE layer); then the dispatch goes out, and the shared expert is
    a hop of its own (with two micro-batches, so the other's attention can run first) or joins
    the first hop (one micro-batch: shared expert before the dispatch, the reference order).
    Few hops matter on a loaded CPU, where every thread hand-over may wait for a core; the
    trace still shows every op, timed inside the hop."""

    def __init__(self, model, client, input_ids: torch.Tensor, batch: AttentionBatch,
                 caches, step_id: int, tracer: ChromeTrace | None = None,
                 outputs: str = "last", single_batch_overlap: bool = True) -> None:
        """outputs: what run() returns: "last", each sequence's last logits; "tokens", every
        token's (logits, final-normed hidden), as a speculative step needs; "last+hidden", the
        last logits and every token's hidden (a prefill feeding the MTP draft layer).
        single_batch_overlap: with one micro-batch, compute the shared expert while the
        dispatch travels (else before it); the same numbers either way."""
        if outputs not in OUTPUTS:
            raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
        self.outputs = outputs
        self.model, self.client, self.input_ids, self.batch = model, client, input_ids, batch
        self.caches, self.step_id, self.tracer = caches, step_id, tracer
        self.compute_s = 0.0
        self.decode = batch.is_decode
        self.parts: list[MicroBatch] = []
        self.cut: int | None = None
        self._hop_done: list[asyncio.Event] = []
        self._compute = compute_thread()
        self._inline_key = None  # set by run(): one micro-batch may skip the hand-over
        self._layers = list(model.layers)
        self._prefix: _Carry | None = None  # two micro-batches: the whole step's dense prefix
        self.single_batch_overlap = single_batch_overlap

    async def _hop(self, mb: int, fn, *args):
        clock = _Clock()
        t0, t1, out = await self._compute.run(fn, clock, *args, inline_key=self._inline_key)
        self.compute_s += t1 - t0
        if self.tracer is not None:
            for name, layer, a, b in clock.spans:
                self.tracer.span(COMPUTE, name, a, b, mb=mb, layer=layer, step=self.step_id)
        return out

    def _advance(self, clock: _Clock, mb: MicroBatch, carry: _Carry, with_shared: bool) -> _Carry:
        """Compute thread: from where `carry` stands to the next MoE layer's gate (or the end)."""
        if carry.h is None:
            carry.h, carry.cos_sin = clock("EMBED", -1, _embed, self.model,
                                           self.input_ids[mb.lo:mb.hi], mb.batch.positions)
        if carry.pending is not None:
            last = self._layers[carry.next_layer - 1]
            carry.h = clock("COMBINE", last.layer_id, last.combine, carry.h, *carry.pending)
            carry.pending = None
        while carry.next_layer < len(self._layers):
            layer = self._layers[carry.next_layer]
            att = self._attention_then_ffn(clock, mb, carry)
            if not layer.is_moe:
                continue
            L = layer.layer_id
            carry.x, carry.weights, carry.ids = att.x, att.weights, att.ids
            if with_shared:
                carry.pending = (None, clock("SHARED", L, layer.shared_expert, att.x), att.x.dtype)
            return carry
        carry.x = carry.weights = carry.ids = None
        return carry

    def _attention_then_ffn(self, clock: _Clock, mb: MicroBatch, carry: _Carry):
        """The next layer's attention (ATTN-0, ATTN-1), and its FFN if dense; returns the
        attention output (a MoE layer's carries the gate's choice)."""
        layer = self._layers[carry.next_layer]
        L, cache = layer.layer_id, self.caches[layer.layer_id]
        carry.next_layer += 1
        q = clock("ATTN-0", L, layer.attn0, carry.h, mb.batch, cache, self.model.rotary,
                  carry.cos_sin)
        # the step's attention path, never the micro-batch's (see Numerics above)
        att = clock("ATTN-1", L, layer.attn1, carry.h, q, mb.batch, cache, self.decode)
        carry.h = att.h
        if not layer.is_moe:
            carry.h = clock("FFN", L, layer.dense_ffn, carry.h)
        return att

    async def _send(self, mb: MicroBatch, micro_batch: int, layer: int, carry: _Carry
                    ) -> asyncio.Future:
        """Sends the layer's dispatch; returns once every share is written, with a task that
        yields the routed output (cancel it to give the dispatch up)."""
        start = getattr(self.client, "start_dispatch", None)
        if start is None:  # a stand-in client with only dispatch(): one span, the round trip
            task = asyncio.ensure_future(self._stand_in(mb, micro_batch, layer, carry))
            await asyncio.sleep(0)  # let it start: its round trip begins now
            return task
        pending = await start(self.step_id, micro_batch, layer, carry.x, carry.ids, carry.weights)
        return asyncio.ensure_future(self._collect(pending, mb, layer))

    async def _stand_in(self, mb: MicroBatch, micro_batch: int, layer: int, carry: _Carry):
        t0 = time.perf_counter()
        routed = await self.client.dispatch(self.step_id, micro_batch, layer, carry.x,
                                            carry.ids, carry.weights)
        if self.tracer is not None:
            self.tracer.span(comm_track(mb.index), "DISPATCH", t0, time.perf_counter(),
                             mb=mb.index, layer=layer, step=self.step_id, tokens=mb.hi - mb.lo)
        return routed

    async def _collect(self, pending, mb: MicroBatch, layer: int):
        routed = await pending.result()
        if self.tracer is not None:
            trace_dispatch(self.tracer, comm_track(mb.index), pending, mb=mb.index, layer=layer,
                           step=self.step_id, tokens=mb.hi - mb.lo)
        return routed

    async def _dispatch(self, mb: MicroBatch, micro_batch: int, layer: int, carry: _Carry):
        return await (await self._send(mb, micro_batch, layer, carry))

    async def _run(self, mb: MicroBatch, micro_batch: int) -> torch.Tensor:
        overlap = len(self.parts) > 1
        # the shared expert computes while the dispatch travels: between the micro-batches'
        # hops (two), or after the send (one, single-batch overlap); else the reference order
        split_shared = overlap or self.single_batch_overlap
        # a prompt split between the micro-batches: micro-batch 1's attention at a layer reads
        # the latent KV micro-batch 0 wrote at that layer, so its k-th hop waits for theirs
        ordered = overlap and mb.index == 1 and self.cut is not None and self._cut_inside_sequence()
        carry, hop = self._first_carry(mb), 0
        while True:
            if ordered:
                await self._hop_done[hop].wait()
            carry = await self._hop(mb.index, self._advance, mb, carry, not split_shared)
            if mb.index == 0 and overlap:
                self._hop_done[hop].set()
            hop += 1
            if carry.x is None:
                return carry.h
            layer_obj = self._layers[carry.next_layer - 1]
            layer = layer_obj.layer_id
            if overlap:  # queue the send, then the shared expert behind the other's hops
                sending = asyncio.ensure_future(self._dispatch(mb, micro_batch, layer, carry))
            elif split_shared:  # send first (every share written), then the shared expert
                sending = await self._send(mb, micro_batch, layer, carry)
            else:  # the reference order: shared expert (in the hop above), then the dispatch
                routed = await self._dispatch(mb, micro_batch, layer, carry)
                carry.pending = (routed, carry.pending[1], carry.pending[2])
                carry.x = carry.weights = carry.ids = None
                continue
            try:
                shared = await self._hop(mb.index, _shared_op, layer, layer_obj, carry.x)
                routed = await sending
            finally:
                if not sending.done():
                    sending.cancel()
            carry.pending = (routed, shared, carry.x.dtype)
            carry.x = carry.weights = carry.ids = None

    def _first_carry(self, mb: MicroBatch) -> _Carry:
        """Where a micro-batch starts: after the whole step's dense prefix, if one ran."""
        pre = self._prefix
        if pre is None:
            return _Carry()
        cos, sin = pre.cos_sin
        return _Carry(h=pre.h[mb.lo:mb.hi], cos_sin=(cos[mb.lo:mb.hi], sin[mb.lo:mb.hi]),
                      next_layer=pre.next_layer)

    def _dense_prefix(self, clock: _Clock) -> _Carry:
        """Compute thread, two micro-batches only: EMBED and the leading dense layers on the
        whole step. No dispatch precedes the first MoE layer, so splitting these layers would
        hide nothing, and one pass over the whole step costs less than two over halves (a
        matmul's time per token falls with the rows: weights are read once)."""
        carry = _Carry()
        whole = MicroBatch(0, 0, self.batch.num_tokens, self.batch)
        carry.h, carry.cos_sin = clock("EMBED", -1, _embed, self.model, self.input_ids,
                                       self.batch.positions)
        while carry.next_layer < len(self._layers) and not self._layers[carry.next_layer].is_moe:
            self._attention_then_ffn(clock, whole, carry)
        return carry

    def _cut_inside_sequence(self) -> bool:
        ends = torch.tensor(self.batch.query_lens).cumsum(0).tolist()
        return self.cut not in ends

    async def run(self, plan, micro_batch: int = 0) -> tuple[object, ForwardStats]:
        """What `outputs` names (default: logits [B, V] of each sequence's last token), and
        how the step went (the step's span goes to the tracer)."""
        t0 = time.perf_counter()
        self.cut = plan_cut(self.batch, plan, self.model.cfg)
        self.parts = micro_batches(self.batch, self.cut)
        if len(self.parts) == 1:
            self._inline_key = (id(self.model), "decode" if self.decode else "prefill",
                                size_bucket(self.batch.num_tokens))
        self._hop_done = [asyncio.Event() for _ in range(len(self._layers) + 2)]
        if len(self.parts) > 1:
            self._prefix = await self._hop(-1, self._dense_prefix)
        runs = [self._run(mb, micro_batch if len(self.parts) == 1 else mb.index)
                for mb in self.parts]
        hs = await _all_or_first_error(runs)
        last = None if self.outputs == "tokens" else self.batch.last_token_indices()
        logits = await self._hop(-1, _logits_op, self.model, hs, last, self.outputs != "last")
        t1 = time.perf_counter()
        stats = ForwardStats(self.step_id, "decode" if self.decode else "prefill",
                             self.batch.num_tokens, len(self.parts), self.cut,
                             int(getattr(plan, "version", 0)), t1 - t0, self.compute_s)
        if self.tracer is not None:
            self.tracer.span(STEPS, f"{stats.phase} step {self.step_id}", t0, t1,
                             tokens=stats.tokens, micro_batches=stats.micro_batches, cut=stats.cut,
                             plan_version=stats.plan_version, compute_s=round(stats.compute_s, 6))
        return logits, stats


def trace_dispatch(tracer: ChromeTrace, track: str, pending, **args) -> None:
    """A finished dispatch's three spans on `track`, in order and not overlapping (see
    trace.py): DISPATCH (routing, encoding, writing every share), MLP (the compute reported by
    the worker whose reply came last, placed to end at that reply's arrival), COMBINE
    (decoding and adding the replies)."""
    t_sent = pending.t_sent
    tracer.span(track, "DISPATCH", pending.t_start, t_sent, workers=len(pending.workers), **args)
    last = pending.last_worker
    if last is not None:
        # the worker's clock is never compared with ours: only its measured duration is used,
        # subtracted from the reply's arrival here; kept after DISPATCH's end (spans on one
        # thread must nest), the args keep the reported times
        t1 = last.reply
        tracer.span(track, "MLP", max(t1 - last.compute_s, t_sent), t1, worker=last.worker,
                    compute_s=round(last.compute_s, 6),
                    worker_compute_s=[round(w.compute_s, 6) for w in pending.workers], **args)
    tracer.span(track, "COMBINE", pending.t_combine, pending.t_done, **args)


def _embed(model, input_ids, positions):
    return model.embed(input_ids.to(model.device)), model.cos_sin(positions)


def _shared_op(clock: _Clock, layer_id: int, layer, x):
    return clock("SHARED", layer_id, layer.shared_expert, x)


def _logits_op(clock: _Clock, model, hs, last, hidden: bool):
    """The logits of rows `last` (None: every token), with every token's hidden if asked."""
    def logits():
        h = hs[0] if len(hs) == 1 else torch.cat(hs)
        if hidden:
            return model.logits_and_hidden(h, last)
        return model.logits(h[last.to(h.device)])

    return clock("LOGITS", -1, logits)


async def _all_or_first_error(coros) -> list:
    """Run concurrently; on the first failure cancel the rest and raise that failure."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def overlapped_forward(model, client, input_ids: torch.Tensor, batch: AttentionBatch,
                             caches, plan, step_id: int, tracer: ChromeTrace | None = None,
                             micro_batch: int = 0) -> tuple[torch.Tensor, ForwardStats]:
    """One step without an engine (tests, benchmarks): OverlappedStep(...).run(...)."""
    step = OverlappedStep(model, client, input_ids, batch, caches, step_id, tracer)
    return await step.run(plan, micro_batch)
