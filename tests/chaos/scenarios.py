"""The scenario matrix: {kind} x {target role} x {moment}, reduced to what fits this machine.

Moments (see runner.py for how each is detected):
- `first`: before the first token: a burst of requests was just sent, none has a token;
- `mid`: mid-stream: requests in flight have streamed tokens and have more to come;
- `kv`: during the KV transfer: a burst of long prompts was sent and a prefill instance has
  just finished a batch (its `epserve_prefill_batch_seconds` count rose), so its KV is on the
  way to a decode instance and no token of the burst has reached the client yet.

A target `decode-*` / `prefill-*` / `router-*` is resolved at the moment of the fault to the
busiest instance of the role (its metrics); `expert-worker-r` names a rank; `partner-of-r` is
the worker holding most of rank r's replicas (read from the topology).

Follow-up faults (`after`): `delay` fires `delay_s` after the previous fault; `restarted`
fires once the previous fault's process was restarted by the supervisor and is SERVING again,
while the rest of the cluster may still be re-admitting it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.chaos.faults import Fault

MOMENTS = ("first", "mid", "kv")
MOMENT_WORDS = {"first": "before 1st token", "mid": "mid-stream", "kv": "during KV transfer"}


@dataclass(frozen=True)
class Step:
    fault: Fault
    after: str = "moment"  # moment | delay | restarted
    delay_s: float = 0.0


@dataclass(frozen=True)
class Scenario:
    key: str  # pytest id
    moment: str
    steps: tuple[Step, ...]
    quick: bool = False  # in `make test`'s subset
    peer_alive: bool = True  # a peer of each failed process stays up: 0 failed is the target

    @property
    def title(self) -> str:
        faults = " then ".join(s.fault.describe() for s in self.steps)
        return f"{faults} {MOMENT_WORDS[self.moment]}"


def single(kind: str, target: str, moment: str, quick: bool = False, **fault) -> Scenario:
    role = target.rsplit("-", 1)[0] if target[-1] in "*0123456789" else target
    key = f"{role}-{kind}-{moment}"
    return Scenario(key, moment, (Step(Fault(kind, target, **fault)),), quick=quick)


QUICK = (
    single("sigkill", "decode-*", "mid", quick=True),
    single("sigkill", "expert-worker-1", "mid", quick=True),
    single("sigstop", "expert-worker-2", "mid", quick=True),
)

MATRIX = (
    *QUICK,
    # decode
    single("sigkill", "decode-*", "kv"),
    single("sigterm", "decode-*", "mid"),
    single("sigstop", "decode-*", "mid"),
    # prefill
    single("sigkill", "prefill-*", "kv"),
    single("sigkill", "prefill-*", "first"),
    single("sigstop", "prefill-*", "first"),
    single("sigterm", "prefill-*", "first"),
    # router
    single("sigkill", "router-*", "first"),
    single("sigkill", "router-*", "mid"),
    single("sigterm", "router-*", "mid"),
    single("sigstop", "router-*", "first"),
    # scheduler and NATS: serving goes on with the last known membership and placement
    single("sigkill", "scheduler", "mid"),
    single("sigstop", "scheduler", "mid"),
    single("sigkill", "nats", "mid"),
    single("sigstop", "nats", "mid"),
    # expert workers: signals and the link in front of them
    single("sigkill", "expert-worker-0", "first"),
    single("sigterm", "expert-worker-3", "mid"),
    single("blackhole", "expert-worker-0", "mid"),
    single("reset", "expert-worker-1", "mid"),
    single("latency", "expert-worker-2", "mid", latency_ms=300.0),
    # a second fault of the same kind while the first is being repaired
    Scenario("decode-sigkill-both-1s-apart", "mid", (
        Step(Fault("sigkill", "decode-0")),
        Step(Fault("sigkill", "decode-1"), after="delay", delay_s=1.0)), peer_alive=False),
    Scenario("expert-worker-sigkill-then-partner", "mid", (
        Step(Fault("sigkill", "expert-worker-0")),
        Step(Fault("sigkill", "partner-of-0"), after="restarted")), peer_alive=False),
)


def by_key() -> dict[str, Scenario]:
    out = {s.key: s for s in MATRIX}
    assert len(out) == len(MATRIX), "scenario keys must be unique"
    return out


def coverage() -> dict[tuple[str, str, str], list[str]]:
    """(kind, role, moment) -> scenario keys: what the reduced matrix covers (docs/chaos.md)."""
    cov: dict[tuple[str, str, str], list[str]] = {}
    for s in MATRIX:
        for step in s.steps:
            t = step.fault.target
            role = "expert-worker" if t.startswith(("expert-worker", "partner")) else \
                t.rsplit("-", 1)[0] if t[-1] in "*0123456789" else t
            cov.setdefault((step.fault.kind, role, s.moment), []).append(s.key)
    return cov
