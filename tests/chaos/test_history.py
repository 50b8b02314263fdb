"""The chaos checker and table, on hand-made histories (pure: no cluster)."""

from __future__ import annotations

import torch

from services.engine.sampling import SamplingParams, sample_token
from tests.chaos.history import Expected, History, UsageRow, check, effective_logits
from tests.chaos.table import Row, markdown, p99_split, percentile, recovery_s

VOCAB = 16
GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=3, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)


def rows_for(tokens: list[int], runner_up: dict[int, tuple[int, float]] | None = None):
    """Logit rows whose argmax is tokens[k]; runner_up[k] = (token, gap) puts a second
    candidate `gap` below it."""
    rows = []
    for k, t in enumerate(tokens):
        row = torch.zeros(VOCAB)
        row[t] = 5.0
        if runner_up and k in runner_up:
            other, gap = runner_up[k]
            row[other] = 5.0 - gap
        rows.append(row)
    return rows


def expected(tokens, runner_up=None, finish="length") -> Expected:
    return Expected(list(tokens), rows_for(tokens, runner_up), finish,
                    "".join(f"<{t}>" for t in tokens))


def history(rid: str, tokens: list[int], params=GREEDY, end="final", indices=None,
            api="grpc", t0=0.0, dt=1.0) -> History:
    h = History(rid, api, [1, 2, 3], params)
    h.sent(t0)
    h.attempt(t0, 0)
    for k, (i, tok) in enumerate(zip(indices or range(len(tokens)), tokens, strict=True)):
        h.token(t0 + dt * (k + 1) / (len(tokens) + 1), i,
                None if api == "openai" else tok, f"<{tok}>" if api == "openai" else "")
    if end == "final":
        h.final(t0 + dt, "length", 3, len(tokens), request_id=rid)
    elif end == "error":
        h.error(t0 + dt, "UNAVAILABLE", "decode went away")
    return h


def usage_for(*hs: History) -> list[UsageRow]:
    return [UsageRow(h.request_id, f"usage-{h.request_id}", 3, len(h.tokens), "length")
            for h in hs]


def decode(prompt_ids, ids):
    return "".join(f"<{t}>" for t in ids)


def test_exact_run_is_clean():
    hs = {"a": history("a", [3, 4, 5]), "b": history("b", [6, 7, 8])}
    exp = {"a": expected([3, 4, 5]), "b": expected([6, 7, 8])}
    rep = check(hs, exp, usage_for(*hs.values()))
    assert (rep.failed, rep.changed, rep.near_ties, rep.violations) == (0, 0, 0, [])


def test_a_different_token_is_a_change_and_a_near_tie_is_not():
    hs = {"a": history("a", [3, 9, 5]), "b": history("b", [6, 10, 8])}
    exp = {"a": expected([3, 4, 5]), "b": expected([6, 7, 8], runner_up={1: (10, 1e-4)})}
    rep = check(hs, exp, usage_for(*hs.values()))
    assert rep.verdicts["a"].changed and not rep.verdicts["b"].changed
    tie = rep.verdicts["b"].near_tie
    assert tie is not None and tie.position == 1 and tie.got == 10
    assert rep.changed == 1 and rep.near_ties == 1
    assert "near-tie (not compared further): b" in rep.summary()


def test_an_error_is_a_failure_and_a_correct_prefix_is_no_change():
    hs = {"a": history("a", [3, 4], end="error")}
    rep = check(hs, {"a": expected([3, 4, 5])}, [])
    v = rep.verdicts["a"]
    assert v.failed and not v.changed and v.error_code == "UNAVAILABLE"
    assert rep.violations == []  # a failed request may have no usage record (router died)


def test_a_wrong_prefix_before_an_error_is_failed_and_changed():
    hs = {"a": history("a", [3, 9], end="error")}
    v = check(hs, {"a": expected([3, 4, 5])}, []).verdicts["a"]
    assert v.failed and v.changed


def test_terminal_events_must_be_exactly_one():
    none = history("a", [3, 4, 5], end="none")
    two = history("b", [3, 4, 5])
    two.error(5.0, "CANCELLED")
    rep = check({"a": none, "b": two}, {"a": expected([3, 4, 5]), "b": expected([3, 4, 5])},
                usage_for(none, two))
    assert rep.verdicts["a"].failed and rep.verdicts["a"].error_code == "no_terminal_event"
    assert "0 terminal events" in rep.verdicts["a"].problems
    assert "2 terminal events" in rep.verdicts["b"].problems and rep.verdicts["b"].failed


def test_token_indices_must_be_contiguous_from_zero():
    gap = history("a", [3, 4, 5], indices=[0, 1, 3])
    dup = history("b", [3, 4, 5], indices=[0, 1, 1])
    late = history("c", [3, 4, 5], indices=[1, 2, 3])
    exp = {r: expected([3, 4, 5]) for r in "abc"}
    rep = check({"a": gap, "b": dup, "c": late}, exp, usage_for(gap, dup, late))
    for rid, at in (("a", "at 2: 3"), ("b", "at 2: 1"), ("c", "at 0: 1")):
        assert any(f"not contiguous from 0 ({at})" in p for p in rep.verdicts[rid].problems)


def test_the_final_usage_must_match_the_stream():
    h = history("a", [3, 4, 5], end="none")
    h.final(1.0, "length", 7, 2, request_id="someone-else")
    problems = check({"a": h}, {"a": expected([3, 4, 5])}, usage_for(h)).verdicts["a"].problems
    assert "final says 2 completion tokens, 3 streamed" in problems
    assert "final says 7 prompt tokens, sent 3" in problems
    assert "final carries request id someone-else" in problems


def test_usage_records_exactly_one_per_request_and_consistent():
    a, b, c, d = (history(r, [3, 4, 5]) for r in "abcd")
    usage = usage_for(a, b, b, d)  # none for c, two for b
    usage[-1] = UsageRow("d", "usage-d", 3, 2, "length")
    rep = check({h.request_id: h for h in (a, b, c, d)},
                {r: expected([3, 4, 5]) for r in "abcd"}, usage)
    assert rep.verdicts["a"].problems == []
    assert "2 usage records" in rep.verdicts["b"].problems
    assert "0 usage records" in rep.verdicts["c"].problems
    assert "usage says 2 completion tokens, client got 3" in rep.verdicts["d"].problems
    assert "usage_id usage-b on 2 records" in rep.problems


def test_migrations_are_summed_from_the_usage_records():
    a = history("a", [3, 4, 5])
    usage = [UsageRow("a", "u-a", 3, 3, "length", migrations=2),
             UsageRow("other-scenario", "u-x", 3, 3, "length", migrations=5)]
    assert check({"a": a}, {"a": expected([3, 4, 5])}, usage).migrations == 2


def test_a_finish_reason_that_differs_is_a_change():
    h = history("a", [3, 4, 5])
    v = check({"a": h}, {"a": expected([3, 4, 5], finish="stop")}, usage_for(h)).verdicts["a"]
    assert v.changed


def test_tokens_of_another_request_are_a_leak():
    a = history("a", [3, 4, 11, 12, 13, 14])
    b = history("b", [11, 12, 13, 14, 15, 1])
    exp = {"a": expected([3, 4, 5, 6, 7, 8]), "b": expected([11, 12, 13, 14, 15, 1])}
    rep = check({"a": a, "b": b}, exp, usage_for(a, b))
    assert rep.verdicts["a"].changed
    assert rep.problems == ["a: stream carries tokens of b"]


def test_a_change_without_foreign_tokens_is_no_leak():
    a = history("a", [3, 4, 9, 9, 9, 9])
    exp = {"a": expected([3, 4, 5, 6, 7, 8]), "b": expected([11, 12, 13, 14, 15, 1])}
    rep = check({"a": a}, exp, usage_for(a))
    assert rep.changed == 1 and rep.problems == []


def test_effective_logits_reproduce_the_sampler():
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        row = torch.randn(VOCAB, generator=g) * 3
        for params in (GREEDY, SEEDED, SamplingParams(temperature=1.3, top_k=4, seed=7)):
            assert int(torch.argmax(effective_logits(row, params, step))) == \
                sample_token(row, params, step)


def test_seeded_requests_use_the_near_tie_rule_on_the_draw():
    base = torch.linspace(0, 2, VOCAB)
    row = base.clone()
    eff = effective_logits(row, SEEDED, 0)
    first, second = torch.topk(eff, 2).indices.tolist()
    # shift the runner-up's logit so that the two draws differ by 1e-5: a near-tie
    row[second] += float(eff[first] - eff[second]) - 1e-5
    exp = Expected([first], [row], "length", "")
    rep = check({"s": history("s", [second], params=SEEDED)}, {"s": exp},
                [UsageRow("s", "u", 3, 1, "length")])
    assert rep.changed == 0 and rep.near_ties == 1
    far = Expected([first], [base], "length", "")
    rep = check({"s": history("s", [second], params=SEEDED)}, {"s": far},
                [UsageRow("s", "u", 3, 1, "length")])
    assert rep.changed == 1


def test_openai_histories_compare_text():
    ok = history("a", [3, 4, 5], api="openai")
    bad = history("b", [3, 6, 5], api="openai")
    cut = history("c", [3], api="openai", end="error")
    exp = {r: expected([3, 4, 5]) for r in "abc"}
    rep = check({"a": ok, "b": bad, "c": cut}, exp, usage_for(ok, bad, cut), decode)
    assert not rep.verdicts["a"].changed and rep.verdicts["a"].problems == []
    assert rep.verdicts["b"].changed
    assert rep.verdicts["c"].failed and not rep.verdicts["c"].changed


def test_openai_text_divergence_at_a_near_tie_is_reported_not_counted():
    h = history("a", [3, 6, 5], api="openai")
    exp = {"a": expected([3, 4, 5], runner_up={1: (6, 1e-5)})}
    rep = check({"a": h}, exp, usage_for(h), decode)
    assert rep.changed == 0 and rep.verdicts["a"].near_tie.position == 1


def test_recovery_and_latency_split():
    hs = [history("a", [1], t0=0.0, dt=1.0), history("b", [1], t0=2.0, dt=4.0),
          history("c", [1], t0=2.5, dt=0.5), history("d", [1], t0=3.0, dt=0.1, end="error"),
          history("e", [1], t0=1.5, dt=3.0)]
    assert recovery_s(hs, fault_t=1.8) == 3.0 - 1.8  # c, sent after the fault, ends at 3.0
    assert recovery_s(hs, fault_t=10.0) is None
    before, after = p99_split(hs, fault_t=1.8)
    assert before == 1.0 and after == 4.0  # e straddles the fault: in neither


def test_percentile_nearest_rank():
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(range(1, 101), 99) == 99


def test_markdown_table_counts_scenarios_meeting_targets():
    hs = {"a": history("a", [3, 4, 5])}
    rep = check(hs, {"a": expected([3, 4, 5])}, usage_for(*hs.values()))
    good = Row.build("decode sigkill mid", rep, hs.values(), fault_t=0.5)
    bad = Row.build("router sigkill mid", rep, hs.values(), fault_t=0.5, note="x|y")
    bad.failed, bad.recovery_s = 2, 3.5
    text = markdown([good, bad], "Chaos run")
    assert "| decode sigkill mid | 1 | 0 | 0 |" in text and "x\\|y" in text
    assert "1/2 scenarios meet the targets" in text
    assert "Recovery above the 2 s target: router sigkill mid." in text


def test_runs_common_to_looping_outputs_are_no_leak():
    a = history("a", [3, 4, 7, 7, 7, 7])  # a random model looping on one token
    exp = {"a": expected([3, 4, 5, 6, 2, 1]), "b": expected([9, 7, 7, 7, 7, 7])}
    assert check({"a": a}, exp, usage_for(a)).problems == []
    spaces = history("c", [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], api="openai")
    exp = {"c": expected([3, 4]), "d": expected([0] * 14)}
    assert check({"c": spaces}, exp, usage_for(spaces), decode).problems == []
