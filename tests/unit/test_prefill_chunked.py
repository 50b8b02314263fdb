"""Chunked prefill: a prompt longer than chunk_tokens runs alone, in pieces that attend to the
KV of the pieces before them; its first token and latent KV equal the unchunked prefill's."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine.sampling import SamplingParams
from services.model.config import ModelConfig
from services.model.loader import load_model
from services.prefill.core import PrefillCore


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ModelConfig.from_dir(tiny_model_dir), load_model(tiny_model_dir)


def core_for(cfg, model, chunk_tokens: int, calls: list) -> PrefillCore:
    async def forward(ids, batch, layers):
        calls.append(ids.numel())
        return model(ids, batch, layers)

    return PrefillCore(cfg, forward, torch.float32, "cpu", max_batch_tokens=4096,
                       chunk_tokens=chunk_tokens)


async def prefill_all(core: PrefillCore, prompts: list[list[int]]):
    core.start()
    try:
        return await asyncio.wait_for(asyncio.gather(*(
            core.submit(f"r{i}", p, SamplingParams(max_tokens=1)) for i, p in enumerate(prompts))),
            60)
    finally:
        await core.stop()


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (150, 7, 40)]


def test_chunked_equals_unchunked(model):
    cfg, m = model
    whole_calls, chunk_calls = [], []
    whole = asyncio.run(prefill_all(core_for(cfg, m, 4096, whole_calls), prompts(cfg.vocab_size)))
    chunked = asyncio.run(prefill_all(core_for(cfg, m, 32, chunk_calls), prompts(cfg.vocab_size)))
    assert whole_calls == [197]  # one batch of all three
    # 150 tokens alone in 32-token pieces; then the two short ones (<= 32 and 40 > 32: alone)
    assert sorted(chunk_calls) == sorted([32, 32, 32, 32, 22, 7, 32, 8])
    for a, b in zip(whole, chunked, strict=True):
        assert a.first_token == b.first_token
        # fp32, the same math in other shapes: summation order differs, values by rounding.
        torch.testing.assert_close(a.latent, b.latent, rtol=1e-4, atol=1e-5)


def test_chunk_tokens_must_be_positive(model):
    cfg, m = model
    with pytest.raises(ValueError, match="chunk_tokens"):
        core_for(cfg, m, 0, [])
