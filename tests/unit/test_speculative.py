"""Speculative decoding's schedule (services/engine/speculative.py) over a fake model whose
greedy next token is (token + 1) mod V, with drafters that are always right, always wrong, or
right by turns: the output never depends on the draft, only the tokens per step do."""

from __future__ import annotations

import torch

from services.engine.sampling import SamplingParams
from services.engine.sequence import Sequence
from services.engine.speculative import Speculation, has_room_for_draft

V = 64


def fake_logits(ids: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(len(ids), V)
    logits[torch.arange(len(ids)), (ids + 1) % V] = 5.0
    return logits


class ScriptedDrafter:
    """Proposes the true next-next token, or a wrong one where `wrong(call)` says so."""

    def __init__(self, wrong=lambda call: False) -> None:
        self.wrong, self.calls, self.forgotten = wrong, 0, []

    def propose(self, inputs):
        out = []
        for i in inputs:
            self.calls += 1
            right = (i.tokens[-1] + 1) % V
            out.append((right + 7) % V if self.wrong(self.calls) else right)
        return out

    def forget(self, seq_id):
        self.forgotten.append(seq_id)


def seq(rid: str, prompt: list[int], max_tokens: int, max_context: int = 1000) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                    max_context)


def run(spec: Speculation, seqs: list[Sequence], max_steps: int = 100) -> int:
    """Decode until every sequence is done (each starts with its prefill token); the steps."""
    steps = 0
    while (running := [s for s in seqs if not s.finished]) and steps < max_steps:
        plan = spec.plan(running)
        for s, c, d in zip(plan.seqs, plan.chunks, plan.drafts, strict=True):
            assert c.past == s.cache_len and c.new == (1 if d is None else 2)
            # a step writes KV only inside the reservation: prompt + max_tokens - 1 positions
            assert c.past + c.new <= len(s.prompt_ids) + s.params.max_tokens
        hidden = torch.zeros(len(plan.input_ids), 4)
        inputs = spec.settle(plan, fake_logits(plan.input_ids), hidden,
                             lambda s, t, lp, row: s.append(t, lp) or True)
        spec.draft(inputs)
        steps += 1
    return steps


def started(prompts: dict[str, list[int]], max_tokens: int) -> list[Sequence]:
    out = []
    for rid, p in prompts.items():
        s = seq(rid, p, max_tokens)
        s.append((p[-1] + 1) % V)  # the token prefill sampled
        out.append(s)
    return out


def expected(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + 1 + i) % V for i in range(n)]


PROMPTS = {"a": [3, 4, 5], "b": [10], "c": [60, 61, 62, 63]}


def test_right_drafts_double_the_tokens_per_step_and_change_nothing():
    seqs = started(PROMPTS, 9)
    spec = Speculation(ScriptedDrafter())
    steps = run(spec, seqs)
    for s in seqs:
        assert s.output_ids == expected(s.prompt_ids, 9) and s.finish_reason == "length"
    # step 1 has no draft yet (1 token), then 2 a step: 1 + 1 + 2*3 = 8, then 1 (no room)
    assert steps == 5
    assert spec.stats.acceptance() == 1.0
    assert spec.stats.tokens == 3 * 8


def test_wrong_drafts_cost_nothing_but_the_draft():
    seqs = started(PROMPTS, 9)
    spec = Speculation(ScriptedDrafter(wrong=lambda call: True))
    steps = run(spec, seqs)
    for s in seqs:
        assert s.output_ids == expected(s.prompt_ids, 9)
    assert steps == 8 and spec.stats.accepted == [0] and spec.stats.proposed[0] > 0
    assert spec.stats.tokens_per_step == 1.0


def test_mixed_drafts_give_the_same_output():
    seqs = started(PROMPTS, 17)
    spec = Speculation(ScriptedDrafter(wrong=lambda call: call % 3 == 0))
    run(spec, seqs)
    for s in seqs:
        assert s.output_ids == expected(s.prompt_ids, 17)
    assert 0 < spec.stats.acceptance() < 1


def test_no_draft_without_room_for_two_more_tokens():
    s = seq("x", [1, 2], max_tokens=3)
    s.append(3)
    assert has_room_for_draft(s)
    s.append(4)
    assert not has_room_for_draft(s)  # one token left: a draft's KV would pass the reservation
    near_context = seq("y", [1, 2, 3], max_tokens=10, max_context=5)
    near_context.append(4)
    assert not has_room_for_draft(near_context)


def test_a_stop_on_the_first_token_discards_the_accepted_draft():
    s = Sequence("s", [5], SamplingParams(max_tokens=10, stop_token_ids=(9,)), None, 100)
    s.append(6)
    spec = Speculation(ScriptedDrafter())
    run(spec, [s])
    assert s.output_ids == [6, 7, 8, 9] and s.finish_reason == "stop"
    assert "s" in spec.drafter.forgotten


def test_a_sequence_gone_mid_step_is_forgotten():
    seqs = started({"a": [3], "b": [7]}, 10)
    drafter = ScriptedDrafter()
    spec = Speculation(drafter)
    run(spec, seqs, max_steps=2)
    plan = spec.plan(seqs)
    inputs = spec.settle(plan, fake_logits(plan.input_ids), torch.zeros(len(plan.input_ids), 4),
                         lambda s, t, lp, row: s.request_id != "a" and (s.append(t, lp) or True))
    assert [i.seq.request_id for i in inputs] == ["b"]
    assert "a" in drafter.forgotten
