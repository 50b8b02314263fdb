"""A prefill that runs the MTP draft layer (--speculative mtp): its KV of the prompt and first
draft are what the reference engine's speculative prefill computes, chunked or not, and they
travel with the prompt's KV (checksummed) to a decode instance."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine.kv_transfer import DraftKV, KVAssembler, TransferError, kv_chunks
from services.engine.mtp_drafter import MTPDrafter
from services.engine.reference import GenerationRequest, ReferenceEngine, mtp_drafter
from services.engine.sampling import SamplingParams
from services.prefill.core import PrefillCore


@pytest.fixture(scope="module")
def model(tiny_mtp_model_dir):
    from services.model.loader import load_model

    return load_model(tiny_mtp_model_dir, mtp=True)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(8)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (90, 7, 33)]


def prefill(model, chunk_tokens: int):
    async def forward(ids, batch, layers):
        return model(ids, batch, layers)

    async def forward_tokens(ids, batch, layers, all_logits=True):
        return model.forward_tokens(ids, batch, layers, all_logits=all_logits)

    core = PrefillCore(model.cfg, forward, torch.float32, "cpu", chunk_tokens=chunk_tokens,
                       drafter=lambda cache: MTPDrafter(model, cache),
                       forward_tokens=forward_tokens)

    async def run():
        core.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(
                core.submit(f"r{i}", p, SamplingParams(max_tokens=4))
                for i, p in enumerate(prompts(model.cfg.vocab_size)))), 60)
        finally:
            await core.stop()

    return asyncio.run(run())


def reference_drafts(model):
    """The reference engine's speculative prefill: its draft-layer KV and first drafts."""
    eng = ReferenceEngine(model, block_size=8, drafter=mtp_drafter(model))
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=4))
            for i, p in enumerate(prompts(model.cfg.vocab_size))]
    loop = eng.loop(reqs)
    step = loop.next_step()
    loop.consume(step, model.forward_tokens(step.input_ids, step.batch, loop.cache.layers,
                                            all_logits=False))
    return {r.request_id: (loop.cache.read_draft(r.request_id, 0, len(r.prompt_ids)),
                           loop.speculation._drafts[r.request_id]) for r in reqs}


@pytest.mark.parametrize("chunk_tokens", [4096, 32])
def test_prefill_sends_the_reference_draft_kv_and_first_draft(model, chunk_tokens):
    want = reference_drafts(model)
    for i, out in enumerate(prefill(model, chunk_tokens)):
        latent, first = want[f"r{i}"]
        assert out.draft is not None and out.draft.start == 0
        assert out.draft.first_draft == first
        torch.testing.assert_close(out.draft.latent, latent, rtol=1e-4, atol=1e-5)


def test_the_draft_kv_travels_checksummed(model):
    latent = torch.randn(model.cfg.num_hidden_layers, 10, model.cfg.latent_dim)
    draft = DraftKV(torch.randn(1, 6, model.cfg.latent_dim), 4, 77)
    asm = KVAssembler()
    for chunk in kv_chunks("a", latent, 5, chunk_bytes=999, draft=draft):
        asm.add(chunk)
    torch.testing.assert_close(asm.tensor(torch.float32), latent)
    got = asm.draft(torch.float32)
    assert (got.start, got.first_draft) == (4, 77)
    torch.testing.assert_close(got.latent, draft.latent)
    chunks = list(kv_chunks("a", latent, 5, draft=draft))
    chunks[0].first_draft = 78  # a flipped draft is caught like flipped bytes
    tampered = KVAssembler()
    with pytest.raises(TransferError, match="checksum"):
        for chunk in chunks:
            tampered.add(chunk)
    plain = KVAssembler()
    for chunk in kv_chunks("a", latent, 5):
        plain.add(chunk)
    assert plain.draft(torch.float32) is None
