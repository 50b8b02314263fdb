"""An expert worker that dies, or stops answering, mid-generation: the attention side routes
around it (every expert has a replica on another worker), redoes the step, and re-admits the
worker once it answers again. Greedy output still equals the reference engine's."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from services.engine.compare import assert_same_greedy
from services.engine.ep_client import WORKER_DOWN_EVENTS, ExpertClient
from services.engine.ep_engine import EPEngine
from services.local.expert_workers import LocalExpertWorkers
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model
from tests.integration.ep_helpers import prompts, reference_run, requests, table_for

WORKERS, VICTIM = 4, 2


def _down_events() -> float:
    return sum(s.value for m in WORKER_DOWN_EVENTS.collect() for s in m.samples
               if s.name.endswith("_total"))


async def _run_with_fault(model_dir, pool, reqs, fault: str):
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, experts=no_experts(cfg))
    client = await ExpertClient.connect(pool.endpoints, timeout_s=20.0)
    engine = EPEngine(model, client, record_logits=True)
    pid = pool.pid(VICTIM)

    async def inject():
        await asyncio.sleep(0.4)  # mid-generation
        os.kill(pid, signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        if fault == "stop":
            await asyncio.sleep(2.0)
            os.kill(pid, signal.SIGCONT)

    injector = asyncio.create_task(inject())
    try:
        downs_before = _down_events()
        out = await engine.generate(reqs)
        await injector
        marked_down = _down_events() > downs_before  # it was routed around at some point
        if fault == "stop":  # it answers again: the probe re-admits it
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 20.0
            while client.down and loop.time() < give_up:
                await asyncio.sleep(0.1)
        return out, dict(client.down), marked_down
    finally:
        await client.close()


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_lost_expert_worker_is_routed_around(tiny_model_dir, fault):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    table = table_for(cfg, WORKERS, redundant=cfg.n_routed_experts)  # two replicas each
    reqs = requests(prompts(cfg.vocab_size), max_tokens=48)
    expected = reference_run(tiny_model_dir, reqs)
    with LocalExpertWorkers(tiny_model_dir, table) as pool:
        got, down, marked = asyncio.run(_run_with_fault(tiny_model_dir, pool, reqs, fault))
    assert_same_greedy([c.token_ids for c in expected], [c.token_ids for c in got],
                       [c.logits for c in expected], [c.logits for c in got])
    assert marked
    if fault == "kill":
        assert VICTIM in down  # dead: still routed around
    else:
        assert down == {}  # stopped, then continued: re-admitted
