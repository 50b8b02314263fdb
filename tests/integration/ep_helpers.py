"""Shared pieces of the expert-parallel tests: workers, prompts, reference runs."""

from __future__ import annotations

import torch

from services.balance.naive import contiguous_placement
from services.engine.ep_plan import reference_routed
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.loader import load_model


def prompts(vocab: int, lens=(9, 2, 17, 5), seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens]


def requests(prompt_ids, max_tokens: int = 16) -> list[GenerationRequest]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompt_ids)]


def table_for(cfg, workers: int, redundant: int = 0):
    return contiguous_placement(cfg.n_routed_experts, workers, cfg.moe_layer_ids, redundant=redundant)


def reference_run(model_dir, reqs, table=None, wire: str = "fp32"):
    """The reference engine, with the wire's rounding applied when wire != fp32."""
    model = load_model(model_dir)
    routed = None
    if wire != "fp32":
        routed = {layer: reference_routed(bank, table, layer, wire)
                  for layer, bank in model.expert_banks().items()}
    return ReferenceEngine(model, record_logits=True, routed_fns=routed).generate(reqs)
