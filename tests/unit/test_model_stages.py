"""DecoderLayer's public stages composed equal the plain path bit for bit.

The overlapped runtime (services/engine/overlap.py) drives attn0, attn1, dense_ffn,
shared_expert and combine; the plain forward runs attention_block and ffn_block. Both are the
same math, defined once in the layer, so every comparison here is torch.equal, never allclose.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine.compute_thread import compute_thread
from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.microbatch import OverlapSettings
from services.engine.overlap import overlapped_forward
from services.model.deepseek import Attended
from services.model.loader import load_model

PROMPTS = (5, 2, 7)
KINDS = ("prefill", "decode", "mixed")  # mixed: decode tokens and a new prompt in one step


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_model_dir):
    return load_model(tiny_model_dir, dtype=request.param)


def _ids(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.cfg.vocab_size, (batch.num_tokens,), generator=g)


def _step(model, kind):
    """(cache, batch, input ids) of a step of `kind`; a decode step's context is prefilled."""
    cfg = model.cfg
    cache = LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, 16, 8, dtype=model.dtype)
    prefill = cache.batch([SeqChunk(str(i), 0, n) for i, n in enumerate(PROMPTS)])
    if kind == "prefill":
        return cache, prefill, _ids(model, prefill)
    model(_ids(model, prefill), prefill, cache.layers)
    chunks = [SeqChunk(str(i), n, 1) for i, n in enumerate(PROMPTS)]
    if kind == "mixed":
        chunks.append(SeqChunk("new", 0, 4))
    batch = cache.batch(chunks)
    return cache, batch, _ids(model, batch, seed=1)


def _layer_input(model, batch):
    h = torch.randn(batch.num_tokens, model.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    return h.to(model.dtype)


def _staged_layer(model, layer, h, batch, cache, cos_sin, decode_step=None):
    """One layer as the overlapped runtime runs it, with the local experts as the dispatch."""
    q = layer.attn0(h, batch, cache, model.rotary, cos_sin)
    att = layer.attn1(h, q, batch, cache, decode_step)
    assert isinstance(att, Attended)
    if not layer.is_moe:
        assert att.x is att.weights is att.ids is None
        return layer.dense_ffn(att.h)
    shared = layer.shared_expert(att.x)
    routed = layer.mlp.experts(att.x, att.ids, att.weights)
    return layer.combine(att.h, routed, shared, att.x.dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["dense", "moe"])
@torch.inference_mode()
def test_stages_equal_attention_block_and_ffn_block(model, kind, which):
    cfg = model.cfg
    layer_id = cfg.moe_layer_ids[0] if which == "moe" else \
        next(i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i))
    layer = model.layers[layer_id]
    assert layer.is_moe == (which == "moe")
    cache, batch, _ = _step(model, kind)
    h, cos_sin = _layer_input(model, batch), model.cos_sin(batch.positions)
    ref_cache, stage_cache = cache.layers[layer_id], cache.layers[layer_id].clone()

    mid = layer.attention_block(h, batch, ref_cache, model.rotary, cos_sin)
    want = layer.ffn_block(mid)
    q = layer.attn0(h, batch, stage_cache, model.rotary, cos_sin)
    att = layer.attn1(h, q, batch, stage_cache)
    assert torch.equal(ref_cache, stage_cache)  # ATTN-0 wrote the same latent KV
    assert torch.equal(att.h, mid)
    assert torch.equal(_staged_layer(model, layer, h, batch, stage_cache.clone(), cos_sin), want)
    if layer.is_moe:
        x = layer.post_attention_layernorm(mid)
        weights, ids = layer.mlp.gate(x)
        assert torch.equal(att.x, x) and torch.equal(att.weights, weights)
        assert torch.equal(att.ids, ids)
        assert att.weights.dtype == torch.float32 and want.dtype == model.dtype
        # ffn_block with a replacement for the local experts (an EP dispatch) is the same too
        assert torch.equal(layer.ffn_block(mid, layer.mlp.experts), want)
    else:
        assert torch.equal(layer.dense_ffn(mid), want)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_stages_compose_to_forward(model, kind):
    cache, batch, ids = _step(model, kind)
    staged_caches = [c.clone() for c in cache.layers]
    want = model(ids, batch, cache.layers, all_logits=True)
    h, cos_sin = model.embed(ids), model.cos_sin(batch.positions)
    for layer in model.layers:
        h = _staged_layer(model, layer, h, batch, staged_caches[layer.layer_id], cos_sin)
    assert torch.equal(model.logits(h), want)
    assert all(torch.equal(a, b) for a, b in zip(cache.layers, staged_caches, strict=True))


@torch.inference_mode()
def test_decode_step_override_picks_the_expanded_path(model):
    """A micro-batch of one-token sequences inside a prefill step (decode_step=False) attends
    exactly as the naive expanded path does; None decides from the batch (absorbed here)."""
    layer = model.layers[model.cfg.moe_layer_ids[0]]
    attn = layer.self_attn
    cache, batch, _ = _step(model, "decode")
    assert batch.is_decode
    h, cos_sin = _layer_input(model, batch), model.cos_sin(batch.positions)
    q = layer.attn0(h, batch, cache.layers[layer.layer_id], model.rotary, cos_sin)
    kv = cache.layers[layer.layer_id]
    split_piece = attn.attend(*q, batch, kv, decode_step=False)
    auto = attn.attend(*q, batch, kv)
    assert torch.equal(attn.attend(*q, batch, kv, decode_step=True), auto)
    try:
        attn.mode = "expanded"
        expanded = attn.attend(*q, batch, kv)
        assert torch.equal(attn.attend(*q, batch, kv, decode_step=True), expanded)  # mode wins
        layer_expanded = layer.attn1(h, q, batch, kv)
    finally:
        attn.mode = "auto"
    assert torch.equal(split_piece, expanded)
    assert not torch.equal(auto, expanded)  # the two paths round differently: the check bites
    layer_split = layer.attn1(h, q, batch, kv, decode_step=False)
    assert torch.equal(layer_split.h, layer_expanded.h)
    assert torch.equal(layer_split.ids, layer_expanded.ids)
    tol = 1e-4 if model.dtype == torch.float32 else 0.1
    assert (auto.float() - expanded.float()).abs().max() < tol  # the same function


@torch.inference_mode()
def test_decode_step_true_needs_a_decode_batch(model):
    layer = model.layers[0]
    cache, batch, _ = _step(model, "mixed")
    h, cos_sin = _layer_input(model, batch), model.cos_sin(batch.positions)
    q = layer.attn0(h, batch, cache.layers[0], model.rotary, cos_sin)
    with pytest.raises(ValueError, match="one new token per sequence"):
        layer.attn1(h, q, batch, cache.layers[0], decode_step=True)


class _LocalExperts:
    """A stand-in ExpertClient with only dispatch(): the model's own experts."""

    def __init__(self, model) -> None:
        self.model = model

    async def dispatch(self, step_id, micro_batch, layer, x, ids, weights):
        # on the compute thread, as the plain forward's experts: see below
        return await compute_thread().call(self.model.layers[layer].mlp.experts, x, ids, weights)


@pytest.mark.parametrize("kind", KINDS)
def test_one_micro_batch_overlapped_forward_equals_forward(model, kind):
    """The overlapped runtime drives the same stages: with one micro-batch (the reference op
    order) it returns the plain forward's logits bit for bit."""
    cache, batch, ids = _step(model, kind)
    caches = [c.clone() for c in cache.layers]
    # The plain forward on the compute thread too, which runs with this thread's torch thread
    # count (BLAS blocks a matmul by it), as the inline hops do: this compares bit for bit.
    want = asyncio.run(compute_thread().call(model, ids, batch, cache.layers))
    got, stats = asyncio.run(overlapped_forward(model, _LocalExperts(model), ids, batch, caches,
                                                OverlapSettings(micro_batches=1), step_id=0))
    assert stats.micro_batches == 1
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cache.layers, caches, strict=True))
