"""Micro-batch split policy (pure) and the overlapped forward's arithmetic, in one process.

The split must change no result: every op is row-wise except attention, which is per
sequence, and a prompt split between the micro-batches reads the KV its first part wrote.
Here the routed experts run in-process behind a stand-in client (no workers), so the
overlapped step is compared with the model's own forward on many random batch shapes.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch

from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.microbatch import (
    SPLIT_POLICIES,
    CostModel,
    OverlapSettings,
    check_plan_fields,
    choose_cut,
    micro_batches,
    plan_cut,
    split_costs,
    token_range_batch,
    wants_split,
)
from services.engine.overlap import overlapped_forward
from services.model.config import ModelConfig
from services.model.loader import load_model
from services.model.presets import PRESETS
from services.protos_gen.epserve.v1 import control_pb2


def test_policies_match_the_scheduler():
    from services.scheduler.config import SPLIT_POLICIES as SCHEDULER_POLICIES

    assert tuple(SPLIT_POLICIES) == tuple(SCHEDULER_POLICIES)


def test_plan_validation_accepts_the_proto_and_rejects_nonsense():
    check_plan_fields(control_pb2.OverlapPlan(version=3, micro_batches=2,
                                              split_policy="even_tokens", min_batch_tokens=0))
    with pytest.raises(ValueError, match="micro_batches"):
        OverlapSettings(micro_batches=3)
    with pytest.raises(ValueError, match="split_policy"):
        OverlapSettings(split_policy="random")
    with pytest.raises(ValueError, match="min_batch_tokens"):
        OverlapSettings(min_batch_tokens=-1)


def test_gating():
    two = OverlapSettings(micro_batches=2, min_batch_tokens=16)
    assert not wants_split(15, two) and wants_split(16, two)
    assert not wants_split(1, OverlapSettings(micro_batches=2, min_batch_tokens=0))
    assert not wants_split(1000, OverlapSettings(micro_batches=1))


def _naive_costs(qlens, past, cost: CostModel):
    """Cost of both micro-batches for every cut, by walking the pieces."""
    T = sum(qlens)
    out0, out1 = [], []
    for t in range(1, T):
        c = [0.0, 0.0]
        off = 0
        for n, p in zip(qlens, past, strict=True):
            for side, (a, b) in enumerate(((off, min(off + n, t)), (max(off, t), off + n))):
                if a >= b:
                    continue
                for j in range(a - off, b - off):
                    c[side] += cost.alpha + p + j + 1
                c[side] += cost.gamma * (p + (b - off))  # this piece's context length
            off += n
        out0.append(c[0])
        out1.append(c[1])
    return np.array(out0), np.array(out1)


@pytest.mark.parametrize("seed", range(5))
def test_split_costs_match_a_naive_walk(seed):
    rng = random.Random(seed)
    qlens = [rng.choice([1, 1, rng.randint(1, 12)]) for _ in range(rng.randint(1, 6))]
    if sum(qlens) < 2:
        qlens.append(3)
    past = [rng.randint(0, 30) for _ in qlens]
    cost = CostModel(alpha=rng.uniform(0, 50), gamma=rng.uniform(0, 3))
    got = split_costs(qlens, past, cost)
    want = _naive_costs(qlens, past, cost)
    np.testing.assert_allclose(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1])


def test_even_tokens_and_degenerate_cuts():
    assert choose_cut([5, 4], [0, 0], "even_tokens") == 4
    assert choose_cut([1], [7], "even_tokens") is None
    assert choose_cut([1], [7], "balanced_attention", CostModel(1.0)) is None
    with pytest.raises(ValueError):
        choose_cut([2, 2], [0, 0], "nope")


def test_balanced_decode_split_follows_context_lengths():
    cost = CostModel(alpha=10.0)
    assert choose_cut([1] * 6, [20] * 6, "balanced_attention", cost) == 3  # equal contexts
    # one long context on the left balances several short ones on the right
    cut = choose_cut([1] * 6, [200, 5, 5, 5, 5, 5], "balanced_attention", cost)
    assert cut == 1


def test_balanced_prefill_splits_a_long_prompt_past_its_middle():
    cost = CostModel(alpha=4.0, gamma=0.0)
    cut = choose_cut([64], [0], "balanced_attention", cost)
    # later tokens attend to more context, so the first micro-batch gets more tokens
    assert 64 // 2 < cut < 64
    c0, c1 = split_costs([64], [0], cost)
    assert abs(c0[cut - 1] - c1[cut - 1]) <= cost.alpha + 64


def test_cost_model_from_the_model_shapes():
    cfg = ModelConfig.from_dict(PRESETS["v3-mini"])
    dec, pre = CostModel.for_model(cfg, decode=True), CostModel.for_model(cfg, decode=False)
    assert dec.alpha > 0 and dec.gamma == 0 and pre.alpha > 0 and pre.gamma > 0


def _cache_batch(cfg, past_and_new, block_size=8):
    blocks = sum(-(-(p + n) // block_size) for p, n in past_and_new) + 1
    cache = LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, blocks, block_size)
    return cache, cache.batch([SeqChunk(f"s{i}", p, n) for i, (p, n) in enumerate(past_and_new)])


def test_token_range_batches_cover_the_batch():
    cfg = ModelConfig.from_dict(PRESETS["tiny"])
    _, batch = _cache_batch(cfg, [(0, 5), (3, 1), (0, 7)])
    parts = micro_batches(batch, 8)  # cuts the third sequence after 2 of its 7 tokens
    a, b = parts[0].batch, parts[1].batch
    assert a.query_lens == (5, 1, 2) and b.query_lens == (5,)
    assert torch.equal(torch.cat([a.positions, b.positions]), batch.positions)
    assert torch.equal(torch.cat([a.write_slots, b.write_slots]), batch.write_slots)
    assert torch.equal(a.context_slots[2], batch.context_slots[2][:2])  # up to its own tokens
    assert torch.equal(b.context_slots[0], batch.context_slots[2])  # the whole prompt
    whole = token_range_batch(batch, 0, batch.num_tokens)
    assert whole.query_lens == batch.query_lens
    assert micro_batches(batch, None)[0].batch is batch
    with pytest.raises(ValueError):
        token_range_batch(batch, 3, 3)


def test_plan_cut_uses_the_plan():
    cfg = ModelConfig.from_dict(PRESETS["tiny"])
    _, batch = _cache_batch(cfg, [(0, 9), (0, 3)])
    assert plan_cut(batch, OverlapSettings(micro_batches=1), cfg) is None
    assert plan_cut(batch, OverlapSettings(micro_batches=2, min_batch_tokens=13), cfg) is None
    assert plan_cut(batch, OverlapSettings(micro_batches=2, split_policy="even_tokens",
                                           min_batch_tokens=0), cfg) == 6
    assert 0 < plan_cut(batch, OverlapSettings(micro_batches=2, min_batch_tokens=0), cfg) < 12


# ---- the overlapped step's arithmetic, experts in-process ----------------------------------

class LocalExperts:
    """Stands in for ExpertClient: the full model's own expert banks, behind an await."""

    def __init__(self, model) -> None:
        self.banks = model.expert_banks()
        self.steps = 0
        self.calls: list[tuple[int, int, int, int]] = []  # (step, micro-batch, layer, tokens)

    def new_step(self) -> int:
        self.steps += 1
        return self.steps

    async def dispatch(self, step_id, micro_batch, layer_id, x, ids, weights):
        self.calls.append((step_id, micro_batch, layer_id, x.shape[0]))
        await asyncio.sleep(0.001 * (1 - micro_batch))  # micro-batch 0's replies come later
        with torch.inference_mode():
            return self.banks[layer_id](x, ids, weights)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _random_steps(rng, cfg):
    """A few steps of (past, new) chunks: a prefill step, a mixed step, a decode step."""
    prompts = [rng.randint(1, 20) for _ in range(rng.randint(1, 5))]
    yield [(0, n) for n in prompts]
    yield [(n, 1) for n in prompts] + [(0, rng.randint(2, 15))]
    yield [(n + 1, 1) for n in prompts]


@pytest.mark.parametrize("policy", SPLIT_POLICIES)
def test_overlapped_step_equals_the_whole_batch(tiny_model, policy):
    model, cfg = tiny_model, tiny_model.cfg
    plan = OverlapSettings(micro_batches=2, split_policy=policy, min_batch_tokens=0)
    rng = random.Random(7)
    g = torch.Generator().manual_seed(0)

    async def run():
        client = LocalExperts(model)
        splits = 0
        for _ in range(6):
            state = {}
            for chunks in _random_steps(rng, cfg):
                total = sum(p + n for p, n in chunks) + 64
                caches = {}
                for name in ("ref", "ovl"):
                    caches[name] = state.get(name) or LatentKVCache(
                        cfg.num_hidden_layers, cfg.latent_dim, total // 8 + len(chunks) + 4, 8)
                    state[name] = caches[name]
                sc = [SeqChunk(f"s{i}", p, n) for i, (p, n) in enumerate(chunks)]
                b_ref, b_ovl = caches["ref"].batch(sc), caches["ovl"].batch(sc)
                ids = torch.randint(5, cfg.vocab_size, (b_ref.num_tokens,), generator=g)
                want = model(ids, b_ref, caches["ref"].layers)
                got, stats = await overlapped_forward(model, client, ids, b_ovl,
                                                      caches["ovl"].layers, plan, client.new_step())
                splits += stats.micro_batches == 2
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                for ref_layer, ovl_layer in zip(caches["ref"].layers, caches["ovl"].layers,
                                                strict=True):
                    torch.testing.assert_close(ovl_layer, ref_layer, rtol=1e-5, atol=1e-5)
        return splits, client.calls

    splits, calls = asyncio.run(run())
    assert splits >= 12
    assert {mb for _, mb, _, _ in calls} == {0, 1}


def test_one_micro_batch_is_the_reference_order(tiny_model):
    model, cfg = tiny_model, tiny_model.cfg

    async def run():
        client = LocalExperts(model)
        cache = LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, 8, 8)
        batch = cache.batch([SeqChunk("a", 0, 9), SeqChunk("b", 0, 4)])
        ids = torch.arange(5, 18)
        logits, stats = await overlapped_forward(model, client, ids, batch, cache.layers,
                                                 OverlapSettings(micro_batches=1), 1)
        return logits, stats, client.calls

    logits, stats, calls = asyncio.run(run())
    assert stats.micro_batches == 1 and stats.cut is None and logits.shape == (2, cfg.vocab_size)
    assert [(mb, layer, n) for _, mb, layer, n in calls] == [(0, layer, 13) for layer in cfg.moe_layer_ids]
    assert 0 < stats.compute_s <= stats.wall_s
