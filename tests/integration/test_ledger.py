"""Live metering through the real cluster: the ledger service folds the usage stream and the
heartbeats; `epserve economics live` reads it. Every figure is checked against the responses
the clients received and against independent arithmetic on the prices.

The ledger bills with a price table whose off-peak tier is in force now (the test controls the
schedule, not the clock), so the off-peak price is what every request must pay.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import nats
import openai
import pytest

from services.client import InferenceClient
from services.common.metrics_http import scrape_metrics
from services.engine.sampling import SamplingParams
from services.ledger.store import read_ledger
from services.local.cluster import ClusterSpec
from tests.integration.cluster_helpers import start, wait_for

STANDARD = {"input_cache_hit": "0.07", "input_cache_miss": "0.27", "output": "1.10"}
OFF_PEAK = {"input_cache_hit": "0.035", "input_cache_miss": "0.135", "output": "0.55"}


def price_file(tmp_path) -> str:
    """deepseek-v3 prices with an off-peak tier from an hour ago to two hours from now."""
    now = datetime.now(UTC)
    clock = [(now + timedelta(hours=h)).strftime("%H:%M") for h in (-1, 2)]
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({
        "version": "test", "models": {"deepseek-v3": STANDARD},
        "tiers": [{"name": "off_peak", "timezone": "UTC", "from": clock[0], "to": clock[1],
                   "models": {"deepseek-v3": OFF_PEAK}}]}))
    return str(path)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    prices = price_file(tmp_path_factory.mktemp("ledger"))
    t0 = time.time()
    c = start(ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2,
                          http_port=0, extra={"ledger": ("--prices", prices,
                                                         "--flush-interval-s", "0.5")}))
    c.t0 = t0
    yield c
    codes = c.stop()
    # a ledger on SIGTERM drains and exits by itself (its pull subscription once kept the NATS
    # drain waiting past the grace: SIGKILL, -9, on every stop)
    assert codes["ledger"] == 0, codes


def live(cluster, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "services.cli", "economics", "live", "--json",
                          "--nats-url", cluster.nats_url, *cluster.operator_args(), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_billed(cluster, n: int) -> dict:
    """The live report once the ledger has folded n records (a bounded wait)."""
    report: dict = {}

    def done() -> bool:
        nonlocal report
        report = live(cluster)
        return report["ledger"]["records_billed"] >= n

    wait_for(done, timeout=60, what=f"the ledger to bill {n} requests")
    return report


def usd(tokens: dict, prices: dict) -> Decimal:
    """Independent arithmetic: tokens x USD per million, for the three kinds."""
    kinds = (("input_cache_hit", "input_cache_hit"), ("input_cache_miss", "input_cache_miss"),
             ("output_total", "output"))
    return sum((Decimal(tokens[k]) * Decimal(prices[p]) for k, p in kinds), Decimal(0)) / 10**6


async def grpc_requests(endpoint: str, n: int, request_id=None) -> list:
    async with InferenceClient(endpoint) as client:
        return list(await asyncio.gather(*(
            client.generate(request_id or f"ledger-g{i}", prompt="to be or not " * (i + 1),
                            params=SamplingParams(max_tokens=4 + i, ignore_eos=True))
            for i in range(n))))


def http_requests(url: str, n: int) -> list[tuple[int, int]]:
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    model = api.models.list().data[0].id
    usages = []
    for i in range(n):
        r = api.completions.create(model=model, prompt="what light through " * (i + 1),
                                   max_tokens=3 + i)
        usages.append((r.usage.prompt_tokens, r.usage.completion_tokens))
    return usages


def test_usage_of_every_response_equals_the_live_totals_and_revenue_is_off_peak(cluster):
    got = asyncio.run(grpc_requests(cluster.router_endpoint, 5))
    grpc_usage = [(r.server_usage.prompt_tokens, r.server_usage.completion_tokens) for r in got]
    assert all(len(r.token_ids) == 4 + i for i, r in enumerate(got))
    usages = grpc_usage + http_requests(cluster.http_url, 3)
    report = wait_billed(cluster, len(usages))
    tokens = report["tokens"]
    assert report["ledger"]["records_billed"] == len(usages)
    assert tokens["input_cache_hit"] == 0
    assert tokens["input_cache_miss"] == sum(p for p, _ in usages)
    assert tokens["output_total"] == sum(c for _, c in usages)
    assert Decimal(report["revenue_usd"]) == usd(tokens, OFF_PEAK)
    assert Decimal(report["theoretical_revenue_usd"]) == usd(tokens, STANDARD)
    assert set(report["revenue_by_tier"]) == {"off_peak"}
    # The same figures on the ledger's Prometheus endpoint.
    m = scrape_metrics(cluster.metrics_urls["ledger"])
    assert m["epserve_ledger_billed_records"] == len(usages)
    assert m["epserve_ledger_revenue_usd"] == pytest.approx(float(usd(tokens, OFF_PEAK)))


def test_two_requests_reusing_a_client_id_are_both_billed(cluster):
    before = live(cluster)["ledger"]["records_billed"]
    for _ in range(2):
        asyncio.run(grpc_requests(cluster.router_endpoint, 1, request_id="same-client-id"))
    assert wait_billed(cluster, before + 2)["ledger"]["records_billed"] == before + 2


def read_uptimes(cluster) -> list:
    async def go():
        nc = await nats.connect(cluster.nats_url, **cluster.nats_options())
        try:
            return (await read_ledger(nc.jetstream())).uptimes
        finally:
            await nc.close()

    return asyncio.run(go())


def uptime_seconds(uptimes) -> float:
    return sum(u.seconds() for u in uptimes)


def test_cost_follows_the_devices_that_are_up(cluster, tmp_path):
    """The four device holders (1 prefill, 1 decode, 2 expert workers) are billed from their
    process start to their last heartbeat; nothing else is. (With the offline report's charts.)"""
    before = read_uptimes(cluster)
    report = live(cluster, "--chart-dir", str(tmp_path))
    after = read_uptimes(cluster)
    now = time.time()
    assert sorted(u.role for u in after) == ["decode", "expert-worker", "expert-worker",
                                             "prefill"]
    for u in after:
        assert len(u.intervals) == 1 and cluster.t0 <= u.intervals[0][0]
        assert now - 5 <= u.intervals[0][1] <= now  # heard within a few heartbeats
    seconds = round(Decimal(report["gpu_hours"]) * 3600, 9)  # whole seconds per interval end
    assert seconds == int(seconds)
    assert Decimal(uptime_seconds(before)) - 4 <= seconds <= Decimal(uptime_seconds(after))
    assert round(Decimal(report["cost_usd"]) * 1800, 9) == seconds  # $2 per device-hour
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live_income_cost.png", "live_nodes.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in tmp_path.iterdir())


def test_killing_the_ledger_scheduler_and_nats_mid_workload_loses_and_doubles_nothing(cluster):
    """Each fault lands while requests are in flight: SIGKILL of the ledger (restarted), of the
    scheduler (restarted), and a NATS restart (the routers spool usage meanwhile)."""
    start_report = live(cluster)
    before = start_report["ledger"]
    nats_node = cluster.nats_cluster.nodes[0]

    def restart(name: str) -> None:
        proc = cluster.process(name)
        proc.kill()
        proc.start()

    faults = [lambda: restart("ledger"), lambda: restart("scheduler"), nats_node.restart]

    async def workload() -> list:
        out = []
        for fault in faults:
            batch = asyncio.ensure_future(grpc_requests(cluster.router_endpoint, 4))
            await asyncio.sleep(0.3)  # the requests are in flight
            await asyncio.to_thread(fault)
            out += await batch
        out += await grpc_requests(cluster.router_endpoint, 2)  # after the last fault
        return out

    got = asyncio.run(workload())
    for name in ("ledger", "scheduler"):
        cluster.process(name).wait_healthy(cluster.endpoints[name], 60)
    report = wait_billed(cluster, before["records_billed"] + len(got))
    assert report["ledger"]["records_billed"] == before["records_billed"] + len(got)
    assert report["ledger"]["cursor"] == report["ledger"]["usage_stream_last_seq"]
    tokens, earlier = report["tokens"], start_report["tokens"]
    assert tokens["output_total"] - earlier["output_total"] == sum(len(r.token_ids) for r in got)
    assert tokens["input_cache_miss"] - earlier["input_cache_miss"] == sum(
        r.server_usage.prompt_tokens for r in got)
