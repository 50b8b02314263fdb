"""Two-micro-batch overlap over real expert-worker processes: outputs never change.

Master invariant: with overlap on (both split policies, and tuned: each step one or two
micro-batches as the engine's OverlapTuner finds faster) the EP engine returns what it returns
with overlap off and what the reference engine returns, for odd batch sizes, batch size 1 (a
prompt split between the micro-batches), requests leaving at different steps, and requests
joining mid-stream (their prefill in the same step as the others' decode). A plan changed
mid-run through NATS KV (adopted by the PlanWatcher) changes no output and never applies
within a step. A trace file is valid Chrome-trace JSON with the compute and communication
tracks and a span per micro-batch per layer per operation (on the communication tracks
DISPATCH, the worker's MLP and COMBINE, in that order), with overlap on and off.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from services.attention.plan_watch import PlanWatcher
from services.common import subjects
from services.common.control import connect, kv_bucket
from services.engine.compare import assert_same_greedy
from services.engine.ep_client import ExpertClient
from services.engine.ep_engine import EPEngine
from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.microbatch import OverlapSettings
from services.engine.overlap_tuner import OverlapTuner
from services.engine.reference import GenerationLoop, GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams, sample_token
from services.engine.sequence import Sequence
from services.engine.trace import ChromeTrace
from services.local.expert_workers import LocalExpertWorkers
from services.local.nats_server import NatsServer
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model
from services.protos_gen.epserve.v1 import control_pb2
from tests.integration.ep_helpers import table_for

pytestmark = pytest.mark.timeout(240)

OFF = OverlapSettings(micro_batches=1, version=1)
BALANCED = OverlapSettings(micro_batches=2, split_policy="balanced_attention", min_batch_tokens=0,
                           version=2, fixed=True)
EVEN = OverlapSettings(micro_batches=2, split_policy="even_tokens", min_batch_tokens=0, version=3,
                       fixed=True)
TUNED = OverlapSettings(micro_batches=2, min_batch_tokens=0, version=4)  # the tuner decides

# (prompt lengths, max_tokens per request): odd batch, batch of one, three uneven prompts
WORKLOADS = {
    "odd5": ((11, 3, 19, 6, 1), (9, 4, 7, 9, 2)),
    "single": ((23,), (8,)),
    "three": ((4, 29, 7), (6, 3, 8)),
}


def make_requests(vocab: int, lens, max_tokens, seed: int = 101, tag: str = "q"):
    g = torch.Generator().manual_seed(seed)
    return [GenerationRequest(f"{tag}{i}", torch.randint(5, vocab, (n,), generator=g).tolist(),
                              SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (n, m) in enumerate(zip(lens, max_tokens, strict=True))]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    with LocalExpertWorkers(tiny_model_dir, table_for(cfg, 2)) as pool:
        yield {"dir": tiny_model_dir, "cfg": cfg, "endpoints": pool.endpoints,
               "full": load_model(tiny_model_dir),
               "attn": load_model(tiny_model_dir, experts=no_experts(cfg))}


def _check(want, got):
    assert_same_greedy([c.token_ids for c in want], [c.token_ids for c in got],
                       [c.logits for c in want], [c.logits for c in got])


async def _generate(engine: EPEngine, reqs, plan):
    """EPEngine.generate with a fixed plan, keeping every step's ForwardStats."""
    engine.plan = plan
    loop = GenerationLoop(engine.cfg, reqs, engine.block_size, engine.model.dtype,
                          engine.model.device, True, engine.stats)
    stats = []
    while (step := loop.next_step()) is not None:
        loop.consume(step, await engine.forward(step.input_ids, step.batch, loop.cache.layers))
        stats.append(engine.last_forward)
    return loop.completions(), stats


def _with_engine(setup, body):
    """body(engine) on an EPEngine over the module's expert workers, its client closed after."""
    async def run():
        client = await ExpertClient.connect(setup["endpoints"])
        try:
            return await body(EPEngine(setup["attn"], client, record_logits=True))
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_overlap_on_equals_off_and_reference(setup, workload):
    lens, max_tokens = WORKLOADS[workload]
    reqs = make_requests(setup["cfg"].vocab_size, lens, max_tokens)
    want = ReferenceEngine(setup["full"], record_logits=True).generate(reqs)

    async def every_plan(engine):
        return {p.version: await _generate(engine, reqs, p) for p in (OFF, BALANCED, EVEN, TUNED)}

    runs = _with_engine(setup, every_plan)
    off, _ = runs[OFF.version]
    print(f"{workload}: overlap off vs reference")
    _check(want, off)
    for plan in (BALANCED, EVEN):
        got, stats = runs[plan.version]
        print(f"{workload}: {plan.split_policy} vs reference, and vs overlap off")
        _check(want, got)
        _check(off, got)
        prefill = stats[0]
        assert prefill.phase == "prefill" and prefill.micro_batches == 2  # a single prompt too
        decode_splits = [s.micro_batches for s in stats[1:]]
        if len(lens) == 1:
            assert set(decode_splits) == {1}  # one token: nothing to split
        else:
            assert 2 in decode_splits
        assert all(s.plan_version == plan.version for s in stats)
    assert all(s.micro_batches == 1 for s in runs[OFF.version][1])
    tuned, _ = runs[TUNED.version]
    _check(want, tuned)


def _seed_tuner(engine: EPEngine, slower: int, version: int) -> None:
    """Tell the engine's tuner, for every step size, that `slower` micro-batches cost a minute
    per token: far beyond what real steps can pull the average back from in one test."""
    engine.tuner.reset_for(version)
    for phase in ("prefill", "decode"):
        for bucket in range(12):
            for _ in range(engine.tuner.warmup):
                engine.tuner.record(phase, 2 ** bucket, slower, 60.0)
                engine.tuner.record(phase, 2 ** bucket, 3 - slower, 1e-6)


@pytest.mark.parametrize("slower", [1, 2])
def test_the_tuner_picks_the_way_it_measured_faster(setup, slower):
    """With measurements saying `slower` micro-batches lose, every step the plan would split
    runs the other way (the run is too short for an exploration step), and outputs equal the
    reference either way."""
    lens, max_tokens = WORKLOADS["odd5"]
    reqs = make_requests(setup["cfg"].vocab_size, lens, max_tokens)
    want = ReferenceEngine(setup["full"], record_logits=True).generate(reqs)

    async def seeded(engine):
        _seed_tuner(engine, slower, TUNED.version)
        return await _generate(engine, reqs, TUNED)

    got, stats = _with_engine(setup, seeded)
    _check(want, got)
    splittable = [s for s in stats if s.tokens >= 2]
    assert len(splittable) >= 5
    assert len(stats) < OverlapTuner().explore_every  # too short a run for an exploration step
    assert [s.micro_batches for s in splittable] == [3 - slower] * len(splittable)


class Staggered:
    """Continuous batching like a decode instance: request i joins at step `arrivals[i]`
    (its whole prompt in that step, next to the others' decode tokens) and leaves after its
    max_tokens; a finished sequence's cache blocks are freed and reused by later arrivals."""

    def __init__(self, cfg, reqs, arrivals, block_size: int = 8) -> None:
        self.cfg, self.reqs, self.arrivals = cfg, reqs, arrivals
        blocks = sum(-(-(len(r.prompt_ids) + r.params.max_tokens) // block_size) for r in reqs)
        self.cache = LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, blocks, block_size)
        self.logits: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in reqs}

    async def run(self, forward, before_step=None):
        seqs: dict[str, Sequence] = {}
        step, last_arrival = 0, max(self.arrivals)
        while True:
            for r, a in zip(self.reqs, self.arrivals, strict=True):
                if a == step:
                    seqs[r.request_id] = Sequence(r.request_id, list(r.prompt_ids), r.params,
                                                  self.cfg.eos_token_id,
                                                  self.cfg.max_position_embeddings)
            active = [s for s in seqs.values() if not s.finished]
            if not active and step > last_arrival:
                break
            if active:
                chunks, ids = [], []
                for s in active:
                    if s.output_ids:
                        chunks.append(SeqChunk(s.request_id, s.cache_len, 1))
                        ids.append(s.output_ids[-1])
                    else:
                        chunks.append(SeqChunk(s.request_id, 0, len(s.prompt_ids)))
                        ids.extend(s.prompt_ids)
                batch = self.cache.batch(chunks)
                if before_step is not None:
                    await before_step(step)
                logits = await forward(torch.tensor(ids), batch, self.cache.layers)
                for s, row in zip(active, logits.float(), strict=True):
                    self.logits[s.request_id].append(row.clone())
                    s.append(sample_token(row, s.params, len(s.output_ids)))
                    if s.finished:
                        self.cache.free(s.request_id)
            step += 1
        return [seqs[r.request_id].output_ids for r in self.reqs], \
            [self.logits[r.request_id] for r in self.reqs]


JOIN_LENS, JOIN_MAX, JOIN_AT = (7, 2, 15, 5, 9), (10, 6, 5, 8, 4), (0, 0, 2, 3, 6)


def _reference_staggered(setup, reqs):
    model = setup["full"]

    async def forward(ids, batch, caches):
        return model(ids, batch, caches)

    return asyncio.run(Staggered(setup["cfg"], reqs, JOIN_AT).run(forward))


def test_requests_joining_and_leaving_mid_stream(setup):
    reqs = make_requests(setup["cfg"].vocab_size, JOIN_LENS, JOIN_MAX, seed=202, tag="j")
    want_ids, want_logits = _reference_staggered(setup, reqs)

    async def run():
        client = await ExpertClient.connect(setup["endpoints"])
        try:
            engine = EPEngine(setup["attn"], client, plan=BALANCED)
            splits = []

            async def forward(ids, batch, caches):
                out = await engine.forward(ids, batch, caches)
                splits.append((batch.is_decode, engine.last_forward.micro_batches))
                return out

            return await Staggered(setup["cfg"], reqs, JOIN_AT).run(forward), splits
        finally:
            await client.close()

    (got_ids, got_logits), splits = asyncio.run(run())
    assert_same_greedy(want_ids, got_ids, want_logits, got_logits)
    assert (False, 2) in splits and (True, 2) in splits  # mixed steps and decode steps split


def test_plan_changed_through_nats_mid_run_changes_no_output(setup, tmp_path):
    reqs = make_requests(setup["cfg"].vocab_size, JOIN_LENS, JOIN_MAX, seed=303, tag="p")
    want_ids, want_logits = _reference_staggered(setup, reqs)
    plans = [control_pb2.OverlapPlan(version=v, micro_batches=mb, split_policy=pol,
                                     min_batch_tokens=mbt)
             for v, (mb, pol, mbt) in enumerate([
                 (1, "balanced_attention", 0), (2, "balanced_attention", 0),
                 (2, "even_tokens", 0), (2, "balanced_attention", 6), (1, "even_tokens", 0),
                 (2, "even_tokens", 2)], start=1)]

    async def run(nats_url):
        nc = await connect(nats_url, "test-plan")
        kv = await kv_bucket(nc.jetstream(), subjects.PLAN_BUCKET)
        await kv.put(subjects.PLAN_KEY, plans[0].SerializeToString())
        client = await ExpertClient.connect(setup["endpoints"])
        engine = EPEngine(setup["attn"], client)
        watcher = await PlanWatcher(kv, lambda p: setattr(engine, "plan", p), poll_s=0.02).start()
        assert engine.plan.version == 1
        used, racing = [], []

        async def before_step(step):
            if step % 2 == 1 and step // 2 + 1 < len(plans):  # a new plan every other step
                plan = plans[step // 2 + 1]
                await kv.put(subjects.PLAN_KEY, plan.SerializeToString())
                for _ in range(500):
                    if engine.plan.version == plan.version:
                        break
                    await asyncio.sleep(0.01)
                assert engine.plan.version == plan.version

        async def forward(ids, batch, caches):
            version = engine.plan.version

            async def swap_during_step():  # a plan arriving mid-step waits for the next step
                await asyncio.sleep(0)
                racing.append(engine.plan)
                engine.plan = OverlapSettings(micro_batches=2, min_batch_tokens=0, version=99)

            swapper = asyncio.create_task(swap_during_step())
            out = await engine.forward(ids, batch, caches)
            await swapper
            used.append(engine.last_forward.plan_version)
            assert engine.last_forward.plan_version == version
            engine.plan = racing.pop()
            return out

        try:
            result = await Staggered(setup["cfg"], reqs, JOIN_AT).run(forward, before_step)
        finally:
            await watcher.stop()
            await client.close()
            await nc.drain()
        return result, used, watcher.adopted

    with NatsServer(store_dir=tmp_path / "js") as nats:
        (got_ids, got_logits), used, adopted = asyncio.run(run(nats.url))
    assert_same_greedy(want_ids, got_ids, want_logits, got_logits)
    assert len(set(used)) >= 5 and adopted >= 5, used


COMM_OPS = ("DISPATCH", "MLP", "COMBINE")


def _trace_run(setup, path, plan):
    cfg = setup["cfg"]
    reqs = make_requests(cfg.vocab_size, (13, 4, 9), (3, 3, 3), seed=404, tag="t")

    async def run():
        client = await ExpertClient.connect(setup["endpoints"])
        try:
            engine = EPEngine(setup["attn"], client, tracer=ChromeTrace(path, "decode test"))
            completions, stats = await _generate(engine, reqs, plan)
            engine.tracer.write()
            return stats
        finally:
            await client.close()

    stats = asyncio.run(run())
    events = json.loads(path.read_text())["traceEvents"]
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and "ts" in e for e in spans)
    by_track = {}
    for e in spans:
        by_track.setdefault(threads[e["tid"]], []).append(e)
    return stats, threads, by_track


def _check_comm_spans(cfg, by_track, mb, steps):
    """DISPATCH, MLP, COMBINE once per step per MoE layer on the micro-batch's communication
    track, in that order without overlapping; returns each dispatch's [start, end]."""
    eps = 0.01  # microseconds: ts and dur are rounded separately
    spans = {}
    for e in by_track[f"communication mb{mb}"]:
        key = (e["args"]["step"], e["args"]["layer"], e["name"])
        assert key not in spans, key
        assert e["args"]["mb"] == mb
        spans[key] = (e["ts"], e["ts"] + e["dur"], e["args"])
    assert set(spans) == {(s, layer, op) for s in steps for layer in cfg.moe_layer_ids
                          for op in COMM_OPS}
    trips = []
    for step in steps:
        for layer in cfg.moe_layer_ids:
            (d0, d1, _), (m0, m1, margs), (c0, c1, _) = (spans[(step, layer, op)]
                                                         for op in COMM_OPS)
            assert d0 <= d1 <= m0 + eps and m0 <= m1 <= c0 + eps and c0 <= c1, (step, layer)
            # the worker's reported compute; the span shows it unless clamped at DISPATCH's end
            assert margs["compute_s"] > 0 and margs["compute_s"] in margs["worker_compute_s"]
            assert m1 - m0 <= margs["compute_s"] * 1e6 + 0.5 + eps  # compute_s: 6 decimals
            trips.append((d0, c1))
    return trips


def test_trace_file_has_the_tracks_and_spans(setup, tmp_path):
    cfg = setup["cfg"]
    stats, threads, by_track = _trace_run(setup, tmp_path / "trace.json", BALANCED)
    assert {"compute", "communication mb0", "communication mb1", "steps"} <= set(threads.values())
    steps = {e["args"]["step"] for e in by_track["compute"] if "step" in e.get("args", {})}
    assert len(by_track["steps"]) == len(stats) == len(steps) == 3
    moe, dense = cfg.moe_layer_ids, [i for i in range(cfg.num_hidden_layers) if i not in cfg.moe_layer_ids]
    for step in steps:
        have = {(e["name"], e["args"]["mb"], e["args"]["layer"]) for e in by_track["compute"]
                if e["args"]["step"] == step}
        # the leading dense layers run once on the whole step (mb -1): no dispatch precedes
        # them, so halves would hide nothing
        prefix = [i for i in dense if i < min(moe)]
        assert prefix and ("EMBED", -1, -1) in have
        for layer in prefix:
            assert {("ATTN-0", -1, layer), ("ATTN-1", -1, layer), ("FFN", -1, layer)} <= have
        for mb in (0, 1):
            for layer in moe:
                assert {("ATTN-0", mb, layer), ("ATTN-1", mb, layer), ("SHARED", mb, layer),
                        ("COMBINE", mb, layer)} <= have
            for layer in dense:
                if layer not in prefix:
                    assert {("ATTN-0", mb, layer), ("ATTN-1", mb, layer), ("FFN", mb, layer)} <= have
            assert not any(key[1] == mb and key[2] in prefix for key in have)
    mb0_trips = _check_comm_spans(cfg, by_track, 0, steps)
    _check_comm_spans(cfg, by_track, 1, steps)
    # the point of it all: some of micro-batch 1's compute ran while micro-batch 0's dispatch
    # was in flight
    mb1_compute = [(e["ts"], e["ts"] + e["dur"]) for e in by_track["compute"] if e["args"]["mb"] == 1]
    assert any(a0 < b1 and a1 < b0 for a0, b0 in mb0_trips for a1, b1 in mb1_compute)


def test_trace_without_overlap_has_the_same_communication_spans(setup, tmp_path):
    stats, threads, by_track = _trace_run(setup, tmp_path / "trace.json", OFF)
    assert all(s.micro_batches == 1 for s in stats)
    assert "communication mb1" not in threads.values()
    steps = {e["args"]["step"] for e in by_track["compute"] if "step" in e.get("args", {})}
    assert len(steps) == 3
    _check_comm_spans(setup["cfg"], by_track, 0, steps)
