"""PNG charts in the style of DeepSeek's day-6 figures (matplotlib, Agg backend, imported only
when charts are drawn): hourly income bars under the hourly cost line, and the node count."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from services.economics.money import number  # noqa: E402
from services.economics.report import Report  # noqa: E402
from services.economics.schedule import Schedule  # noqa: E402


def write_charts(report: Report, schedule: Schedule, directory: Path, *, prefix: str = "economics",
                 title: str = "") -> list[Path]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create chart directory {directory}: {exc.strerror or exc}") from None
    income, nodes = directory / f"{prefix}_income_cost.png", directory / f"{prefix}_nodes.png"
    income_cost_chart(report, income, title)
    node_chart(report, schedule, nodes, title)
    return [income, nodes]


def income_cost_chart(report: Report, path: Path, title: str = "Day") -> None:
    hours = report.hours
    # Rates per hour, so that a partial first or last hour is not drawn as a dip.
    series = [[float(value(h)) / ((h.end - h.start) / 3600) for h in hours] for value in (
        lambda h: h.theoretical_revenue_usd, lambda h: h.revenue_usd,
        lambda h: h.occupied.cost_usd)]
    big = max(series[0] + series[2]) >= 10_000
    theoretical, billed, cost = ([v / (1000.0 if big else 1.0) for v in s] for s in series)
    x = list(range(len(hours)))
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.bar(x, theoretical, width=0.8, color="#9ec5f0", label="theoretical income (standard prices)")
    if billed != theoretical:
        ax.bar(x, billed, width=0.5, color="#1f5fa8", label="income as billed (time-of-day tiers)")
    # Hour k's bar is centred on k, so its cost step runs from k - 0.5 to k + 0.5.
    ax.step([k - 0.5 for k in range(len(x) + 1)], [*cost, cost[-1]], where="post",
            color="#f2a900", linewidth=2.5, label="cost")
    ax.set_xticks(x[::2], [h.label for h in hours][::2], rotation=0)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_ylabel("USD per hour (thousands)" if big else "USD per hour")
    ax.set_xlabel(f"hour starting ({report.window.tz})")
    estimated = "" if report.traffic_timed else " - hourly income estimated from day totals"
    ax.set_title(f"{title}: cost and theoretical income{estimated}", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, max([*theoretical, *cost, 0.001]) * 1.25)  # headroom for the legend
    ax.legend(loc="upper center", ncol=3, fontsize=9, frameon=False)
    _save(fig, path)


def node_chart(report: Report, schedule: Schedule, path: Path, title: str = "Day") -> None:
    end = report.window.seconds
    times = sorted({0, end, *[t for t in schedule.edges if 0 <= t <= end]})
    xs = [t / 3600 for t in times]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    if schedule.phased:
        total = [0.0] * len(times)
        for phase, colour in (("prefill", "#7fb77e"), ("decode", "#4a7ebb")):
            if phase in schedule.phases:
                top = [b + schedule.gpus_at(t, phase) / schedule.gpus_per_node
                       for b, t in zip(total, times, strict=True)]
                ax.fill_between(xs, total, top, step="post", alpha=0.8, color=colour, label=phase)
                total = top
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
    ax.set_title(f"{title}: nodes in service - peak {number(o.peak_nodes)}, average "
                 f"{number(o.avg_nodes)} ({number(o.node_hours)} node-hours)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
