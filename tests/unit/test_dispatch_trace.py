"""A dispatch in two halves (start_dispatch, then PendingDispatch.result()) and the spans the
overlapped step draws from its timings, without worker processes: the replies are made here.

PendingDispatch.result() combines in share order whatever order the replies came in, raises
the worker's rejection and DEADLINE_EXCEEDED as dispatch() did, counts its metrics once, and
notes per worker the reply's arrival and the reported compute. The communication track gets
DISPATCH, MLP, COMBINE per micro-batch per MoE layer, in order, with one micro-batch or two.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import torch

from services.engine.ep_plan import WorkerShare
from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.microbatch import OverlapSettings
from services.engine.overlap import overlapped_forward, trace_dispatch
from services.engine.pending_dispatch import DISPATCH_SECONDS, PendingDispatch
from services.engine.tensor_proto import to_proto
from services.engine.trace import ChromeTrace
from services.engine.wire import encode
from services.engine.worker_stream import EPError, WorkerTiming
from services.model.loader import load_model
from services.protos_gen.epserve.v1 import expert_pb2


def _reply(out: torch.Tensor, compute_s: float) -> expert_pb2.DispatchResponse:
    return expert_pb2.DispatchResponse(combined=to_proto(encode(out, "fp32")),
                                       compute_seconds=compute_s)


def _pending(x, shares, futures, timeout_s=5.0) -> PendingDispatch:
    now = time.perf_counter()
    timings = [WorkerTiming(s.worker, send_start=now, sent=now) for s in shares]
    return PendingDispatch(SimpleNamespace(timeout_s=timeout_s), 1, 3, x, shares, futures,
                           timings, now, now, 0.0)


def _count() -> float:
    return next(s.value for s in DISPATCH_SECONDS.collect()[0].samples
                if s.name.endswith("_count"))


def test_result_combines_in_share_order_and_notes_the_timings():
    x = torch.randn(4, 6)
    shares = [WorkerShare(0, torch.tensor([0, 2]), torch.zeros(2, 1, dtype=torch.int32)),
              WorkerShare(1, torch.tensor([1, 2, 3]), torch.zeros(3, 1, dtype=torch.int32))]
    a, b = torch.randn(2, 6), torch.randn(3, 6)

    async def run():
        loop = asyncio.get_running_loop()
        futs = [loop.create_future(), loop.create_future()]
        pending = _pending(x, shares, futs)
        # worker 1 replies first
        loop.call_later(0.002, lambda: futs[1].set_result((_reply(b, 0.004),
                                                           time.perf_counter())))
        loop.call_later(0.010, lambda: futs[0].set_result((_reply(a, 0.001),
                                                           time.perf_counter())))
        before = _count()
        out = await pending.result()
        again = await pending.result()
        return pending, out, again, _count() - before

    pending, out, again, counted = asyncio.run(run())
    want = torch.zeros(4, 6)
    want[[0, 2]] += a
    want[[1, 2, 3]] += b
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert again is out and counted == 1  # metrics once, however often result() is awaited
    w0, w1 = pending.workers
    assert (w0.compute_s, w1.compute_s) == (0.001, 0.004)
    assert w1.reply < w0.reply <= pending.t_combine <= pending.t_done
    assert pending.last_worker is w0  # the combine waited for worker 0


def test_result_raises_the_rejection_and_the_deadline():
    x = torch.randn(2, 4)
    shares = [WorkerShare(1, torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.int32))]

    async def rejected():
        fut = asyncio.get_running_loop().create_future()
        reply = expert_pb2.DispatchResponse()
        reply.error.code, reply.error.message = "FAILED_PRECONDITION", "stale placement"
        fut.set_result((reply, time.perf_counter()))
        await _pending(x, shares, [fut]).result()

    with pytest.raises(EPError) as err:
        asyncio.run(rejected())
    assert err.value.code == "FAILED_PRECONDITION" and err.value.rank == 1

    async def silent():
        fut = asyncio.get_running_loop().create_future()
        await _pending(x, shares, [fut], timeout_s=0.05).result()

    with pytest.raises(EPError) as err:
        asyncio.run(silent())
    assert err.value.code == "DEADLINE_EXCEEDED"


def _spans(tracer: ChromeTrace, track="communication mb0"):
    doc = tracer.document()
    tid = next(e["tid"] for e in doc["traceEvents"]
               if e["name"] == "thread_name" and e["args"]["name"] == track)
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and e["tid"] == tid]


def test_spans_are_ordered_when_grpc_reports_a_write_after_its_reply(tmp_path):
    """gRPC may report a write done after its reply is in; the reply bounds the send, and
    the MLP (of the worker replying last) starts no earlier than DISPATCH ends."""
    t = 100.0
    w0 = WorkerTiming(0, send_start=t + 0.001, sent=t + 0.009, reply=t + 0.004, compute_s=0.003)
    w1 = WorkerTiming(1, send_start=t + 0.002, sent=t + 0.003, reply=t + 0.008, compute_s=0.002)
    pending = PendingDispatch(SimpleNamespace(timeout_s=5.0), 1, 1, torch.zeros(1, 1), [], [],
                              [w0, w1], t, t + 0.009, 0.0, t_combine=t + 0.0085, t_done=t + 0.009)
    assert pending.t_sent == t + 0.004 and pending.last_worker is w1
    tracer = ChromeTrace(tmp_path / "t.json")
    trace_dispatch(tracer, "communication mb0", pending, mb=0, layer=1, step=1)
    got = {e["name"]: (e["ts"], e["ts"] + e["dur"], e.get("args", {})) for e in _spans(tracer)}
    us = 1e6
    assert got["DISPATCH"][:2] == pytest.approx((t * us, (t + 0.004) * us))
    assert got["MLP"][:2] == pytest.approx(((t + 0.006) * us, (t + 0.008) * us))
    assert got["MLP"][2]["worker"] == 1 and got["MLP"][2]["worker_compute_s"] == [0.003, 0.002]
    assert got["COMBINE"][:2] == pytest.approx(((t + 0.0085) * us, (t + 0.009) * us))
    # a reported compute longer than the gap since DISPATCH ended is cut there
    w1.compute_s = 0.01
    tracer = ChromeTrace(tmp_path / "t.json")
    trace_dispatch(tracer, "communication mb0", pending, mb=0, layer=1, step=1)
    mlp = next(e for e in _spans(tracer) if e["name"] == "MLP")
    assert mlp["ts"] == pytest.approx((t + 0.004) * us) and mlp["args"]["compute_s"] == 0.01


class SplitExperts:
    """Stands in for ExpertClient with both halves: the model's own expert banks, one share,
    the reply arriving a little later with a made-up compute time."""

    def __init__(self, model) -> None:
        self.banks = model.expert_banks()
        self.steps = 0

    def new_step(self) -> int:
        self.steps += 1
        return self.steps

    async def start_dispatch(self, step_id, micro_batch, layer_id, x, ids, weights, tag=""):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.banks[layer_id](x, ids, weights).float()
        share = WorkerShare(0, torch.arange(x.shape[0]), ids.to(torch.int32))
        timing = WorkerTiming(0, send_start=t0, sent=time.perf_counter())
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(0.002 * (1 - micro_batch) + 0.0005,
                        lambda: fut.done() or fut.set_result((_reply(out, 0.0003),
                                                               time.perf_counter())))
        return PendingDispatch(SimpleNamespace(timeout_s=5.0), step_id, layer_id, x, [share],
                               [fut], [timing], t0, timing.sent, 0.0)

    async def dispatch(self, *args, **kwargs):
        return await (await self.start_dispatch(*args, **kwargs)).result()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_overlapped_step_traces_dispatch_mlp_combine(tiny_model_dir, tmp_path, micro_batches):
    model = load_model(tiny_model_dir)
    cfg = model.cfg
    cache = LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, 8, 8)
    batch = cache.batch([SeqChunk("a", 0, 9), SeqChunk("b", 0, 4)])
    ids = torch.arange(5, 18)
    plan = OverlapSettings(micro_batches=micro_batches, min_batch_tokens=0)
    tracer = ChromeTrace(tmp_path / "trace.json")
    want = model(ids, batch, LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, 8, 8).layers)

    async def run():
        return await overlapped_forward(model, SplitExperts(model), ids, batch, cache.layers,
                                        plan, 1, tracer)

    got, stats = asyncio.run(run())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert stats.micro_batches == micro_batches
    json.loads(json.dumps(tracer.document()))
    for mb in range(micro_batches):
        spans = _spans(tracer, f"communication mb{mb}")
        assert sorted((e["args"]["layer"], e["name"]) for e in spans) == sorted(
            (layer, op) for layer in cfg.moe_layer_ids for op in ("DISPATCH", "MLP", "COMBINE"))
        for layer in cfg.moe_layer_ids:
            d, m, c = (next(e for e in spans if e["args"]["layer"] == layer and e["name"] == op)
                       for op in ("DISPATCH", "MLP", "COMBINE"))
            eps = 0.01
            assert d["ts"] + d["dur"] <= m["ts"] + eps
            assert m["ts"] + m["dur"] <= c["ts"] + eps
            assert m["dur"] == pytest.approx(300, abs=1)  # the reported 0.3 ms, uncut
