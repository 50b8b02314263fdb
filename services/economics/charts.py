"""PNG charts in the style of DeepSeek's day-6 figures (matplotlib, Agg backend).

- income/cost: bars of hourly income (theoretical, and as billed) under the hourly cost line;
- nodes: the node-count step chart over the window (stacked by phase when the schedule says).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from services.economics import money  # noqa: E402
from services.economics.report import Report  # noqa: E402
from services.economics.schedule import Schedule  # noqa: E402

INCOME_COST = "income_cost.png"
NODES = "nodes.png"


def write_charts(
    report: Report,
    schedule: Schedule,
    directory: Path,
    *,
    prefix: str = "economics",
    title: str = "",
) -> list[Path]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create chart directory {directory}: {exc.strerror or exc}") from None
    income = directory / f"{prefix}_{INCOME_COST}"
    nodes = directory / f"{prefix}_{NODES}"
    income_cost_chart(report, income, title)
    node_chart(report, schedule, nodes, title)
    return [income, nodes]


def income_cost_chart(report: Report, path: Path, title: str = "Day") -> None:
    hours = report.hours
    x = list(range(len(hours)))
    # Rates per hour, so a partial first or last hour is not drawn as a dip.
    span = [(h.end - h.start) / 3600 for h in hours]
    theoretical = [float(h.theoretical_revenue_usd) / s for h, s in zip(hours, span, strict=True)]
    billed = [float(h.revenue_usd) / s for h, s in zip(hours, span, strict=True)]
    cost = [float(h.occupied.cost_usd) / s for h, s in zip(hours, span, strict=True)]
    scale, unit = (
        (1000.0, "USD per hour (thousands)")
        if max([*theoretical, *cost]) >= 10_000
        else (1.0, "USD per hour")
    )
    theoretical, billed, cost = (
        [v / scale for v in series] for series in (theoretical, billed, cost)
    )
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.bar(x, theoretical, width=0.8, color="#9ec5f0", label="theoretical income (standard prices)")
    if billed != theoretical:
        ax.bar(x, billed, width=0.5, color="#1f5fa8", label="income as billed (time-of-day tiers)")
    # Hour k's bar is centred on k, so its cost step runs from k - 0.5 to k + 0.5.
    edges = [k - 0.5 for k in range(len(x) + 1)]
    ax.step(edges, [*cost, cost[-1]], where="post", color="#f2a900", linewidth=2.5, label="cost")
    ax.set_xticks(x[::2], [h.label for h in hours][::2], rotation=0)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_ylabel(unit)
    ax.set_xlabel(f"hour starting ({report.window.tz})")
    estimated = "" if report.traffic_timed else " - hourly income estimated from day totals"
    ax.set_title(f"{title}: cost and theoretical income{estimated}", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    top = max([*theoretical, *cost, 0.001])
    ax.set_ylim(0, top * 1.25)  # headroom for the legend above the bars
    ax.legend(loc="upper center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def node_chart(report: Report, schedule: Schedule, path: Path, title: str = "Day") -> None:
    end = report.window.seconds
    times = sorted({0, end, *[t for t in schedule.edges if 0 <= t <= end]})
    xs = [t / 3600 for t in times]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    if schedule.phased:
        bottom = [0.0] * len(times)
        colours = {"prefill": "#7fb77e", "decode": "#4a7ebb"}
        for phase in (p for p in schedule.phases if p is not None):
            level = [schedule.gpus_at(t, phase) / schedule.gpus_per_node for t in times]
            top = [b + v for b, v in zip(bottom, level, strict=True)]
            ax.fill_between(
                xs, bottom, top, step="post", alpha=0.8, color=colours[phase], label=phase
            )
            bottom = top
        total = bottom
    else:
        total = [schedule.gpus_at(t) / schedule.gpus_per_node for t in times]
        ax.fill_between(xs, 0, total, step="post", alpha=0.35, color="#4a7ebb")
    ax.step(xs, total, where="post", color="#1f3f6e", linewidth=2, label="nodes")
    ticks = list(range(0, end // 3600 + 1, 2))
    ax.set_xticks(ticks, [report.window.clock(h * 3600) for h in ticks])
    ax.set_xlim(0, end / 3600)
    ax.set_ylim(0, max(total + [1]) * 1.12)
    ax.set_ylabel("nodes")
    ax.set_xlabel(f"time ({report.window.tz})")
    o = report.occupied
    ax.set_title(
        f"{title}: nodes in service - peak {money.number(o.peak_nodes)}, "
        f"average {money.number(o.avg_nodes)} ({money.number(o.node_hours)} node-hours)",
        fontsize=11,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
