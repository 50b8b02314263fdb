"""Speculative decoding through expert parallelism: the EP engine over real expert-worker
processes, verifying drafts (MTP's, and a scripted drafter's that is mostly right) with one
and with two micro-batches (cut inside a sequence's token + draft too), returns what the
reference engine returns without speculation (master invariant, near-tie rule)."""

from __future__ import annotations

import asyncio

import pytest

from services.engine.compare import assert_same_greedy
from services.engine.ep_client import ExpertClient
from services.engine.ep_engine import EPEngine
from services.engine.microbatch import OverlapSettings
from services.engine.mtp_drafter import MTPDrafter
from services.engine.reference import ReferenceEngine
from services.local.expert_workers import LocalExpertWorkers
from services.model.checkpoint_gen import make_model
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model
from tests.integration.ep_helpers import prompts, requests, table_for

pytestmark = pytest.mark.timeout(240)

PLANS = {"one": OverlapSettings(micro_batches=1, version=1),
         "even": OverlapSettings(micro_batches=2, split_policy="even_tokens", min_batch_tokens=0,
                                 version=2, fixed=True),
         "balanced": OverlapSettings(micro_batches=2, split_policy="balanced_attention",
                                     min_batch_tokens=0, version=3, fixed=True)}


class Scripted:
    """Drafts plain decoding's next token (from a plain run), wrong every third call."""

    def __init__(self, outputs) -> None:
        self.outputs, self.calls = outputs, 0

    def propose(self, inputs):
        self.calls += 1
        return [self.outputs[i.seq.request_id][len(i.seq.output_ids)] + (self.calls % 3 == 0)
                for i in inputs]

    def forget(self, seq_id):
        pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = make_model("tiny", tmp_path_factory.mktemp("tiny_mtp_ep"), seed=0, mtp=True)
    cfg = ModelConfig.from_dir(model_dir)
    with LocalExpertWorkers(model_dir, table_for(cfg, 2)) as pool:
        yield {"cfg": cfg, "endpoints": pool.endpoints, "full": load_model(model_dir),
               "attn": load_model(model_dir, experts=no_experts(cfg), mtp=True)}


@pytest.mark.parametrize("plan", list(PLANS))
def test_speculative_ep_equals_the_plain_reference(setup, plan):
    reqs = requests(prompts(setup["cfg"].vocab_size, lens=(9, 2, 17)), max_tokens=14)
    want = ReferenceEngine(setup["full"], record_logits=True).generate(reqs)
    outputs = {c.request_id: c.token_ids + [0] for c in want}

    async def run():
        client = await ExpertClient.connect(setup["endpoints"])
        try:
            engine = EPEngine(setup["attn"], client, record_logits=True, plan=PLANS[plan])
            mtp = await engine.generate(reqs, drafter=lambda c: MTPDrafter(setup["attn"], c))
            scripted = await engine.generate(reqs, drafter=lambda c: Scripted(outputs))
            return mtp, scripted, engine.stats.drafts
        finally:
            await client.close()

    mtp, scripted, drafts = asyncio.run(run())
    for got in (mtp, scripted):
        assert_same_greedy([c.token_ids for c in want], [c.token_ids for c in got],
                           [c.logits for c in want], [c.logits for c in got])
    assert drafts.accepted[0] > 10  # the scripted drafts: most accepted
