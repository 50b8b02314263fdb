"""Runs one scenario against the shared cluster: clients, the fault at its moment, the check.

Timeline: 8 clients take requests from one queue (each client a gRPC InferenceClient over both
routers and an OpenAI client per router). After PRE_FAULT requests have finished, the
moment is set up and detected (scenarios.py), the fault fires, the remaining requests flow
through the clients (some sent while the fault holds, all of them after it), then the
histories are checked against the reference and the usage stream, and the cluster is given
time to heal (every service SERVING again) before the next scenario.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from services.local.cluster import LocalCluster
from tests.chaos import harness
from tests.chaos.faults import Fault, Fired, Injector
from tests.chaos.history import History, Report, check
from tests.chaos.scenarios import Scenario, Step
from tests.chaos.table import Row
from tests.chaos.workload import (
    Planned,
    RecordingClient,
    openai_clients,
    run_grpc,
    run_openai,
)

CLIENTS = 8
REQUESTS = 100
PRE_FAULT = 30  # requests finished before the fault's moment is set up
BURST_PROMPT_TOKENS = 320  # the `kv` moment's burst: longer prompts, a longer KV transfer
MOMENT_TIMEOUT_S = 60.0
SCENARIO_TIMEOUT_S = 420.0
POLL_S = 0.005
FIRST_DELAY_S = 0.03  # `first`: the burst's calls were opened this long before the fault


@dataclass
class Run:
    """One scenario's live state, shared by the clients and the conductor."""

    queue: deque[Planned]
    histories: dict[str, History]
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: set[str] = field(default_factory=set)
    finished: int = 0

    def streaming(self) -> list[History]:
        """In flight, with tokens streamed and at least two still to come."""
        hs = [self.histories[r] for r in self.in_flight]
        return [h for h in hs if 1 <= len(h.tokens) <= h.params.max_tokens - 2]

    def before_first_token(self) -> list[History]:
        return [self.histories[r] for r in self.in_flight if not self.histories[r].tokens]


async def _client(k: int, run: Run, grpc_client: RecordingClient, oai, model: str) -> None:
    while True:
        await run.gate.wait()
        if not run.queue:
            return
        r = run.queue.popleft()
        h = run.histories[r.request_id]
        run.in_flight.add(r.request_id)
        h.sent(time.monotonic())
        try:
            if r.api == "grpc":
                await run_grpc(grpc_client, r, h)
            else:
                await run_openai(oai, k, model, r, h)
        finally:
            run.in_flight.discard(r.request_id)
            run.finished += 1


async def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {timeout:.0f}s")
        await asyncio.sleep(POLL_S)


async def _busiest(cluster: LocalCluster, role: str, gauge: str, count: int) -> str:
    names = [f"{role}-{i}" for i in range(count)]
    loads = await asyncio.gather(*(harness.scrape(cluster, n, timeout=0.25) for n in names))
    return max(zip(names, loads, strict=True), key=lambda nl: nl[1].get(gauge, -1.0))[0]


def _busiest_router(run: Run, routers: int) -> str:
    """The router holding most in-flight requests, from the clients' own records (each
    attempt names its router): no scrape, so the moment is not missed."""
    count = [0] * routers
    for rid in run.in_flight:
        tries = [e.index for e in run.histories[rid].events if e.kind == "attempt"]
        if tries:
            count[tries[-1]] += 1
    return f"router-{max(range(routers), key=lambda i: (count[i], -i))}"


async def resolve(cluster: LocalCluster, fault: Fault, kv_prefill: str | None,
                  run: Run) -> Fault:
    """A concrete target for `decode-*`, `prefill-*`, `router-*` and `partner-of-r`."""
    t, s = fault.target, cluster.spec
    if t == "decode-*":
        t = await _busiest(cluster, "decode", "epserve_decode_running_requests", s.decode)
    elif t == "prefill-*":
        t = kv_prefill or await _busiest(cluster, "prefill", "epserve_prefill_queued_requests",
                                         s.prefill)
    elif t == "router-*":
        t = _busiest_router(run, s.routers)
    elif t.startswith("partner-of-"):
        table = await harness.topology(cluster.nats_url, **cluster.nats_options())
        t = f"expert-worker-{harness.replica_partner(table, int(t.rsplit('-', 1)[1]))}"
    return Fault(fault.kind, t, fault.hold_s, fault.latency_ms)


async def _prefill_batches(cluster: LocalCluster) -> dict[str, float]:
    names = [f"prefill-{i}" for i in range(cluster.spec.prefill)]
    got = await asyncio.gather(*(harness.scrape(cluster, n, timeout=0.25) for n in names))
    return {n: m.get("epserve_prefill_batch_seconds_count", 0.0) for n, m in zip(names, got,
                                                                                   strict=True)}


async def _moment(cluster: LocalCluster, run: Run, scenario: Scenario) -> tuple[str | None, str]:
    """Waits for the scenario's moment; returns (the prefill instance that just finished a
    batch, for `kv`; a note on how the moment was met)."""
    if scenario.moment == "mid":
        await _until(lambda: len(run.streaming()) >= 3 or not run.queue and not run.in_flight,
                     MOMENT_TIMEOUT_S, "3 requests mid-stream")
        return None, ""
    run.gate.clear()  # a burst: let the clients go idle, then release them together
    await _until(lambda: not run.in_flight, MOMENT_TIMEOUT_S, "clients idle before the burst")
    burst = sum(r.burst for r in run.queue)
    run.queue = deque(sorted(run.queue, key=lambda r: not r.burst))
    before = await _prefill_batches(cluster) if scenario.moment == "kv" else {}
    run.gate.set()
    await _until(lambda: len(run.in_flight) >= min(burst, CLIENTS), MOMENT_TIMEOUT_S,
                 "the burst sent")
    if scenario.moment == "first":
        burst_hs = [run.histories[r] for r in run.in_flight]
        await _until(lambda: all(any(e.kind == "attempt" for e in h.events) for h in burst_hs),
                     MOMENT_TIMEOUT_S, "the burst's calls opened")
        await asyncio.sleep(FIRST_DELAY_S)
        return None, ""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        now = await _prefill_batches(cluster)
        done = [n for n in now if now[n] > before.get(n, 0.0)]
        if done:
            return done[0], ""
        if not run.before_first_token():
            break
    return None, "kv moment not seen in the prefill metrics: fired late"


def _at_fault(run: Run) -> str:
    return (f"at fault: {len(run.in_flight)} in flight, {len(run.before_first_token())} "
            f"before 1st token, {len(run.streaming())} mid-stream")


async def _fire_steps(cluster: LocalCluster, inj: Injector, run: Run, scenario: Scenario
                      ) -> tuple[list[Fired], str]:
    kv_prefill, note = await _moment(cluster, run, scenario)
    notes = [note] if note else []
    fired: list[Fired] = []
    for i, step in enumerate(scenario.steps):
        if i:
            await _wait_step(cluster, step, fired[-1])
        fault = await resolve(cluster, step.fault, kv_prefill, run)
        fired.append(await inj.fire(fault))
        if i == 0:
            notes.append(_at_fault(run))
    return fired, "; ".join(notes)


async def _wait_step(cluster: LocalCluster, step: Step, previous: Fired) -> None:
    if step.after == "delay":
        await asyncio.sleep(max(0.0, previous.t + step.delay_s - time.monotonic()))
    elif step.after == "restarted":
        name = previous.fault.target
        proc = cluster.process(name)

        async def up() -> bool:
            return proc.is_running() and proc.pid != previous.pid and \
                await cluster.check_health(name, 1.0)

        deadline = time.monotonic() + harness.HEAL_TIMEOUT_S
        while not await up():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not restarted and SERVING in time")
            await asyncio.sleep(0.1)


async def _drive(cluster: LocalCluster, scenario: Scenario, run: Run, model: str
                 ) -> tuple[list[Fired], str]:
    inj = Injector(cluster)
    grpc_clients = [RecordingClient(",".join(cluster.router_endpoints), run.histories)
                    for _ in range(CLIENTS)]
    for k, c in enumerate(grpc_clients):  # start on different routers
        c._next = k
    oai = openai_clients(cluster.http_urls)
    run.gate.set()
    tasks = [asyncio.create_task(_client(k, run, grpc_clients[k], oai, model))
             for k in range(CLIENTS)]
    try:
        await _until(lambda: run.finished >= PRE_FAULT, SCENARIO_TIMEOUT_S, "pre-fault work")
        fired, note = await _fire_steps(cluster, inj, run, scenario)
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), SCENARIO_TIMEOUT_S)
        await inj.wait_repaired(max(s.fault.hold_s for s in scenario.steps) + 10)
        return fired, note
    finally:
        run.gate.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await inj.close()
        for c in grpc_clients:
            await c.close()
        for o in oai:
            await o.close()


def _dump(path, histories, expected, usage) -> None:
    """Every history, its reference and its usage records, for a post-mortem."""
    path.write_text(json.dumps({rid: {
        "api": h.api, "prompt_ids": h.prompt_ids, "params": asdict(h.params),
        "events": [asdict(e) for e in h.events], "want_ids": expected[rid].token_ids,
        "want_text": expected[rid].text, "usage": [asdict(u) for u in usage
                                                  if u.request_id == rid]}
        for rid, h in histories.items()}, indent=1))


@dataclass
class Outcome:
    row: Row
    report: Report
    logs: str


async def run_scenario(cluster: LocalCluster, scenario: Scenario, planned: list[Planned],
                       expected, model: str, decode, prefix: str) -> Outcome:
    sizes = harness.log_sizes(cluster)
    restarts0 = cluster.restarts
    histories = {r.request_id: History(r.request_id, r.api, r.prompt_ids, r.params)
                 for r in planned}
    run = Run(deque(r for r in planned), histories)
    t0 = time.monotonic()
    fired, note = await _drive(cluster, scenario, run, model)
    work_s = time.monotonic() - t0
    ok_ids = {rid for rid, h in histories.items() if h.ok}
    usage = await harness.read_usage(cluster.nats_url, prefix, ok_ids,
                                       **cluster.nats_options())
    report = check(histories, expected, usage, decode)
    _dump(harness.LOG_DIR / f"{prefix}histories.json", histories, expected, usage)
    heal_s = await harness.wait_healthy(cluster)
    restarted = {n: c - restarts0.get(n, 0) for n, c in cluster.restarts.items()
                 if c > restarts0.get(n, 0)}
    faults = ", ".join(f"{f.fault.describe()} (pid {f.pid})" for f in fired)
    row = Row.build(scenario.key, report, histories.values(), fired[0].t,
                    restarts=", ".join(f"{n} x{c}" for n, c in sorted(restarted.items())),
                    note=f"{faults}; {note}; workload {work_s:.0f}s, healthy again "
                         f"{heal_s:.0f}s later",
                    expect_no_failure=scenario.peer_alive)
    return Outcome(row, report, harness.log_excerpt(cluster, sizes))
