"""The chaos matrix against one real, supervised cluster (see docs/chaos.md).

`make chaos` runs every scenario (marker `chaos`); `make test` runs the quick subset (marker
`chaos_quick`: SIGKILL a decode instance mid-stream, SIGKILL an expert worker mid-stream,
SIGSTOP an expert worker). Scenarios share the cluster and run in file order; each waits for
the cluster to be healthy before it starts and after it ends.
"""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path

import pytest

from services.model.config import ModelConfig
from tests.chaos import harness
from tests.chaos.runner import BURST_PROMPT_TOKENS, CLIENTS, REQUESTS, run_scenario
from tests.chaos.scenarios import MATRIX, Scenario
from tests.chaos.table import RECOVERY_TARGET_S, Row, format_row
from tests.chaos.workload import completion_text, plan, reference

# Recovery: the design's target is <= 2 s (reported in every row and in last_run.md). The
# assertion is only a sanity bound: on this 2-core machine shared by ~15 processes (and by
# other work), a supervised restart alone (Python + torch import, weights, warm-up, health)
# takes 5-20 s, and a fault detected by a deadline costs the deadline first.
RECOVERY_BOUND_S = 30.0
HTTP_STREAM_CUT = "openai:APIConnectionError"


def _kills_a_router(s: Scenario) -> bool:
    return s.moment != "first" and any(
        st.fault.target.startswith("router") and st.fault.kind == "sigkill" for st in s.steps)


def _marks(s: Scenario):
    marks = [pytest.mark.chaos, pytest.mark.timeout(900)]
    if s.quick:
        marks.append(pytest.mark.chaos_quick)
    return marks


@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.key, marks=_marks(s))
                                      for s in MATRIX])
def test_scenario(scenario: Scenario, chaos_cluster, reference_model, chaos_rows, capsys,
                  tiny_model_dir):
    index = MATRIX.index(scenario)
    model, tokenizer = reference_model
    vocab = ModelConfig.from_dir(tiny_model_dir).vocab_size
    planned = plan(index, REQUESTS, CLIENTS, vocab,
                   BURST_PROMPT_TOKENS if scenario.moment == "kv" else 0)
    expected = reference(model, tokenizer, planned)

    def decode(prompt_ids, ids):
        return completion_text(tokenizer, prompt_ids, ids)

    prefix = f"chaos-s{index:02d}-"
    try:
        asyncio.run(harness.wait_healthy(chaos_cluster))
        outcome = asyncio.run(run_scenario(chaos_cluster, scenario, planned, expected,
                                           Path(chaos_cluster.spec.model).resolve().name, decode,
                                           prefix))
    except Exception as exc:
        chaos_rows.append(Row(scenario.key, 0, 0, 0, 0, 0, None, None, None,
                              note=f"harness error: {type(exc).__name__}: {exc}"[:300],
                              expect_no_failure=scenario.peer_alive))
        with capsys.disabled():
            print(f"\n{scenario.key}: harness error\n{traceback.format_exc()}")
            print(harness.log_excerpt(chaos_cluster, {}))
        raise
    row = outcome.row
    chaos_rows.append(row)
    with (harness.LOG_DIR / "findings.md").open("a") as f:
        f.write(f"## {scenario.key}: {scenario.title}\n\n{format_row(row)}\n\n"
                f"{outcome.report.summary()}\n\n```\n{outcome.logs}\n```\n\n")
    with capsys.disabled():
        print(f"\n{format_row(row)}")
        if row.recovery_s is not None and row.recovery_s > RECOVERY_TARGET_S:
            print(f"  recovery {row.recovery_s:.2f}s is above the {RECOVERY_TARGET_S:.0f}s target")
        if not row.meets_targets:
            print(outcome.report.summary())
    report = outcome.report
    assert report.changed == 0, report.summary()
    assert not report.violations, report.summary()
    if scenario.peer_alive:
        # The one failure no server can undo: an OpenAI-protocol stream cut mid-stream by
        # its router's death (HTTP has no way to resume it; the gRPC client resumes on the
        # other router). Counted and shown in the table, excused only there.
        cut = report.error_codes.get(HTTP_STREAM_CUT, 0) if _kills_a_router(scenario) else 0
        assert report.failed - cut == 0, report.summary()
        assert row.recovery_s is not None and row.recovery_s <= RECOVERY_BOUND_S, \
            f"recovery {row.recovery_s} s (bound {RECOVERY_BOUND_S} s)"
