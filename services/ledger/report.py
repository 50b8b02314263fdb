"""The running cluster's report from its ledger: read the entries, price and cost them the way
the ledger does, and compute the day with the offline report's code (`compute_report`).

Prices: a given table, else the one the ledger bills with (kept in its KV bucket), with its
`price_as` fallback for served models the table does not list; cost: a given device price, else
the ledger's. Used by `epserve economics live` and by `make run`'s closing margin line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timezone
from decimal import Decimal
from pathlib import Path

import nats

from services.common import subjects
from services.common.control import nats_servers
from services.common.errors import CliError
from services.common.mesh_tls import nats_tls_options
from services.economics.files import load_prices, prices_from_text
from services.economics.live import live_usage, live_window
from services.economics.prices import PriceTable
from services.economics.report import SPREAD_BY_NODES, Report, compute_report
from services.economics.usage import DayUsage
from services.ledger.store import LedgerEntries, read_ledger


@dataclass(frozen=True)
class LiveLedger:
    entries: LedgerEntries
    stream_last_seq: int  # the usage stream's last sequence when it was read

    @property
    def records_billed(self) -> int:
        return sum(b.records for b in self.entries.buckets)

    def summary(self) -> dict:
        cursor = self.entries.cursor
        return {"cursor": cursor, "usage_stream_last_seq": self.stream_last_seq,
                "records_billed": self.records_billed,
                "records_not_yet_folded": max(self.stream_last_seq - cursor, 0)}


async def read_live(url: str, timeout_s: float = 10.0, tls_dir: str = "") -> LiveLedger:
    try:
        # A one-off reader: no reconnects, and no disconnect events logged when it closes.
        nc = await asyncio.wait_for(nats.connect(servers=nats_servers(url), name="economics-live",
                                                 connect_timeout=timeout_s,
                                                 allow_reconnect=False,
                                                 **nats_tls_options(tls_dir)), timeout_s + 1)
    except Exception as exc:
        raise CliError(f"cannot reach NATS at {url}: {type(exc).__name__}: {exc}") from None
    try:
        js = nc.jetstream()
        try:
            entries = await asyncio.wait_for(read_ledger(js, timeout_s), timeout_s * 3)
        except Exception as exc:
            raise CliError(f"no ledger at {url} ({type(exc).__name__}: {exc}); "
                           "`epserve up` starts one, or `epserve serve ledger`") from None
        try:
            info = await asyncio.wait_for(js.stream_info(subjects.USAGE_STREAM), timeout_s)
            last = info.state.last_seq
        except Exception:
            last = entries.cursor
        return LiveLedger(entries, last)
    finally:
        try:
            await asyncio.wait_for(nc.close(), timeout_s)
        except Exception:
            pass


def ledger_prices(meta: dict, path: Path | None = None) -> PriceTable:
    if path is not None:
        return load_prices(path)
    if meta.get("prices_text"):
        return prices_from_text(meta["prices_text"], meta.get("prices_suffix", ".yaml"),
                                meta.get("prices_source", "the ledger's price table"))
    return load_prices(None)


def live_report(entries: LedgerEntries, *, now: float, prices_path: Path | None = None,
                since: datetime | None = None, until: datetime | None = None,
                tz: timezone = UTC, tenant: str | None = None,
                usd_per_gpu_hour: Decimal | None = None, gpus_per_node: int | None = None,
                spread: str = SPREAD_BY_NODES) -> tuple[Report, DayUsage] | None:
    """None when the ledger holds nothing in the span."""
    meta = entries.meta
    window = live_window(entries.buckets, entries.uptimes, now=now, since=since, until=until,
                         tz=tz)
    if window is None:
        return None
    gpus_per_node = gpus_per_node or int(meta.get("gpus_per_node", 8))
    if gpus_per_node < 1:
        raise CliError("--gpus-per-node must be >= 1")
    price = usd_per_gpu_hour if usd_per_gpu_hour is not None else Decimal(
        str(meta.get("usd_per_device_hour", "2")))
    usage = live_usage(entries.buckets, entries.uptimes, window, tenant=tenant,
                       usd_per_gpu_hour=price, gpus_per_node=gpus_per_node)
    prices = ledger_prices(meta, prices_path)
    for model in usage.models:
        if model in prices.models:
            continue
        fallback = meta.get("price_as", "")
        if not fallback or fallback not in prices.models:
            raise CliError(f"no price for model {model!r} in {prices.source or 'the table'} "
                           f"(it prices {', '.join(sorted(prices.models))})")
        prices = prices.with_alias(model, fallback)
        usage = replace(usage, notes=(*usage.notes, f"{model} is billed at {fallback} prices"))
    return compute_report(usage, prices, spread=spread), usage
