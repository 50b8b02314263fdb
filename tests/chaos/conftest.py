"""Fixtures of the chaos suite: one supervised cluster for every scenario of the run, the
model and tokenizer the reference engine runs on, and the table written at the end.

Module-scoped (every scenario is in test_scenarios.py): `make test` runs the chaos subset
first (tests/chaos sorts first), and its 15 processes must not idle through the rest."""

from __future__ import annotations

import asyncio
import datetime
import platform
from pathlib import Path

import pytest

from services.model.loader import load_model
from services.model.tokenizer import Tokenizer
from tests.chaos import harness
from tests.chaos.scenarios import MATRIX
from tests.chaos.table import Row, write_markdown

HERE = Path(__file__).parent
FULL_TABLE = HERE / "last_run.md"  # `make chaos` (the README quotes it)
QUICK_TABLE = HERE / "last_quick_run.md"  # `make test`'s subset only


@pytest.fixture(scope="module")
def chaos_cluster(tiny_mtp_model_dir):
    """Serves tiny with its MTP layer (tiny's weights otherwise): the reference engine runs
    tiny plainly, so every scenario also checks speculative decoding against plain."""
    cluster = harness.start_cluster(tiny_mtp_model_dir)
    try:
        asyncio.run(harness.wait_healthy(cluster))
        yield cluster
    finally:
        harness.stop_cluster(cluster)
        print(f"\nchaos cluster logs: {cluster.log_dir}")


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir):
    return load_model(tiny_model_dir), Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def chaos_rows():
    rows: list[Row] = []
    yield rows
    if not rows:
        return
    quick_only = {r.scenario for r in rows} <= {s.key for s in MATRIX if s.quick}
    path = QUICK_TABLE if quick_only else FULL_TABLE
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    preamble = (
        f"{'`make test` subset' if quick_only else '`make chaos`'}, {when}, "
        f"{platform.machine()} with {_cores()} cores; tiny model with an MTP layer, 2 routers, "
        "2 prefill (running the MTP layer over every prompt), 2 decode (decode-0 speculative "
        "with MTP, decode-1 plain), 4 expert workers (each behind a link proxy, every expert on two of them), "
        "supervised. Per scenario: 100 requests from 8 concurrent clients (1 in 4 through the "
        "openai package), half greedy and half seeded. `failed`: ended in an error; "
        "`changed`: a token the reference engine did not produce (beyond the near-tie rule); "
        "`violations`: protocol checks (terminal events, index contiguity, usage records, "
        "leaks). Recovery: fault to the end of the first successful request sent after it. "
        "See docs/chaos.md.")
    write_markdown(path, rows, "Chaos suite: last run", preamble)
    print(f"\nchaos table written to {path}")


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0))
