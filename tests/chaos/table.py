"""The chaos table: one row per scenario, printed as it finishes and written to last_run.md.

Pure: recovery time and latency percentiles come from the histories' client-side clocks
(one process, one monotonic clock), the rows from the checker's Report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.history import History, Report

RECOVERY_TARGET_S = 2.0  # the design's target: reported, not asserted (see test_scenarios.py)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 100]); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    rank = max(1, math.ceil(q / 100 * len(xs)))
    return xs[rank - 1]


def recovery_s(histories: Iterable[History], fault_t: float) -> float | None:
    """Seconds from the fault to the end of the first request that was sent after it and
    succeeded; None when none did."""
    ends = [h.end_t for h in histories
            if h.ok and h.start_t is not None and h.start_t >= fault_t]
    return min(ends) - fault_t if ends else None


def p99_split(histories: Iterable[History], fault_t: float) -> tuple[float | None, float | None]:
    """p99 end-to-end latency of the successful requests that finished before the fault, and
    of those sent after it."""
    hs = [h for h in histories if h.ok and h.latency_s is not None]
    before = [h.latency_s for h in hs if h.end_t <= fault_t]
    after = [h.latency_s for h in hs if h.start_t >= fault_t]
    return percentile(before, 99), percentile(after, 99)


@dataclass
class Row:
    scenario: str
    requests: int
    failed: int
    changed: int
    near_ties: int
    violations: int
    recovery_s: float | None
    p99_before_s: float | None
    p99_after_s: float | None
    migrations: int = 0
    restarts: str = ""  # processes the supervisor restarted during the scenario
    note: str = ""
    expect_no_failure: bool = True  # single fault with a live peer of the failed role
    errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, scenario: str, report: Report, histories: Iterable[History],
              fault_t: float, **extra) -> Row:
        hs = list(histories)
        before, after = p99_split(hs, fault_t)
        return cls(scenario, report.requests, report.failed, report.changed, report.near_ties,
                   len(report.violations), recovery_s(hs, fault_t), before, after,
                   report.migrations, errors=dict(report.error_codes), **extra)

    @property
    def meets_targets(self) -> bool:
        clean = self.changed == 0 and self.violations == 0
        return clean and (self.failed == 0 or not self.expect_no_failure)


COLUMNS = ("scenario", "requests", "failed", "changed", "near-ties", "violations",
           "recovery s", "p99 before s", "p99 after s", "migrations", "restarted", "note")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def cells(row: Row) -> list[str]:
    note = row.note
    if row.errors:
        note = (note + "; " if note else "") + "errors " + ", ".join(
            f"{k} x{v}" for k, v in sorted(row.errors.items()))
    if not row.expect_no_failure:
        note = (note + "; " if note else "") + "no live peer: failures allowed"
    return [row.scenario, str(row.requests), str(row.failed), str(row.changed),
            str(row.near_ties), str(row.violations), _num(row.recovery_s),
            _num(row.p99_before_s), _num(row.p99_after_s), str(row.migrations),
            row.restarts or "-", note or ""]


def format_row(row: Row) -> str:
    c = cells(row)
    return (f"{c[0]:<34} req {c[1]:>3} failed {c[2]:>3} changed {c[3]:>3} ties {c[4]} "
            f"viol {c[5]:>2} recovery {c[6]:>6}s p99 {c[7]:>6}s -> {c[8]:>6}s "
            f"migr {c[9]} restarted {c[10]} {c[11]}")


def markdown(rows: list[Row], title: str, preamble: str = "") -> str:
    esc = [[c.replace("|", "\\|") for c in cells(r)] for r in rows]
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble, ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    met = sum(r.meets_targets for r in rows)
    slow = [r.scenario for r in rows if r.recovery_s is not None
            and r.recovery_s > RECOVERY_TARGET_S]
    lines += ["", f"{met}/{len(rows)} scenarios meet the targets (0 changed, 0 violations, "
                  f"0 failed where a peer of the failed role was alive).",
              f"Recovery above the {RECOVERY_TARGET_S:.0f} s target: "
              + (", ".join(slow) if slow else "none") + "."]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: list[Row], title: str, preamble: str = "") -> None:
    path.write_text(markdown(rows, title, preamble))
