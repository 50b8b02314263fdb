"""The ledger's Prometheus metrics: the cluster's running revenue, cost and tokens.

Totals are gauges set from the ledger's entries (not counters incremented per record), so a
restarted ledger exports the same figures it had, and a scrape never sees a half-folded batch.
"""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter, Gauge

from services.economics import money
from services.economics.tally import Tally, totals

RECORDS = Counter("epserve_ledger_records_total", "usage records read from the stream, by "
                  "outcome (folded; unreadable or unpriced: not billed)", ["outcome"])
FOLD_ERRORS = Counter("epserve_ledger_fold_errors_total", "failed fetches or KV writes (retried)")
TOKENS = Gauge("epserve_ledger_tokens", "tokens billed so far", ["model", "kind"])
BILLED = Gauge("epserve_ledger_billed_records", "usage records in the totals")
REVENUE = Gauge("epserve_ledger_revenue_usd", "revenue so far, as billed (time-of-day tiers)")
THEORETICAL = Gauge("epserve_ledger_theoretical_revenue_usd", "revenue at standard prices")
DEVICE_SECONDS = Gauge("epserve_ledger_device_seconds", "device-seconds of occupancy so far")
COST = Gauge("epserve_ledger_cost_usd", "occupancy cost so far (device-hours x price)")
MARGIN = Gauge("epserve_ledger_margin", "revenue / cost - 1 (NaN without cost)")
CURSOR = Gauge("epserve_ledger_cursor", "every usage-stream sequence up to this is folded in")

def publish(tally: Tally, cursor: int, usd_per_device_hour: Decimal) -> None:
    t = totals(tally)
    for model, counts in t.tokens_by_model.items():
        for kind in ("input_cache_hit", "input_cache_miss", "output"):
            TOKENS.labels(model=model, kind=kind).set(getattr(counts, kind))
    cost = t.cost_usd(usd_per_device_hour)
    BILLED.set(t.records)
    REVENUE.set(float(t.revenue_usd))
    THEORETICAL.set(float(t.theoretical_revenue_usd))
    DEVICE_SECONDS.set(t.device_seconds)
    COST.set(float(cost))
    margin = money.margin(t.revenue_usd, cost)
    MARGIN.set(float("nan") if margin is None else float(margin))
    CURSOR.set(cursor)
