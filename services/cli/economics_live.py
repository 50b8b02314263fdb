"""`epserve economics live`: DeepSeek's cost / revenue / margin table for the running cluster.

Reads the ledger's entries from JetStream KV (services/ledger), turns them into a day
(economics/live.py) and computes it with the offline report's code (`compute_report`, the same
text, `--json` fields and charts as `economics report`). Prices: `--prices FILE`, else the table
the ledger bills with (kept in its KV bucket), with its `--price-as` fallback for served models
the table does not list; cost: `--usd-per-gpu-hour`, else the ledger's `--usd-per-device-hour`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.common import subjects
from services.common.control import connect
from services.common.errors import CliError
from services.economics import views
from services.economics.files import load_prices, prices_from_text
from services.economics.live import live_usage, live_window
from services.economics.prices import PriceTable
from services.economics.report import compute_report
from services.economics.window import zone
from services.ledger.store import LedgerEntries, read_ledger

_SPAN = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub, common) -> None:
    live = sub.add_parser("live", help="the running cluster's cost, revenue and margin, per "
                          "hour, from its ledger (epserve up runs one)")
    live.add_argument("--nats-url", default=os.environ.get("EPSERVE_NATS_URL",
                                                           "nats://127.0.0.1:4222"),
                      help="the cluster's NATS (epserve up prints it; $EPSERVE_NATS_URL)")
    live.add_argument("--since", type=_instant, help="ISO date-time, or a span back from now "
                      "(90m, 2h, 1d); rounded down to the hour (default: the ledger's first hour)")
    live.add_argument("--until", type=_instant, help="ISO date-time or span back (default: now)")
    live.add_argument("--timezone", type=lambda v: zone(v, "--timezone"), default=UTC,
                      help="zone of the hourly rows (a fixed offset: UTC, UTC+8)")
    live.add_argument("--tenant", help="tokens and revenue of one tenant only")
    live.add_argument("--usd-per-gpu-hour", type=_decimal,
                      help="device price (default: the ledger's --usd-per-device-hour)")
    live.add_argument("--gpus-per-node", type=int, help="default: the ledger's")
    live.add_argument("--timeout-s", type=float, default=10.0, help="NATS deadline")
    common(live, chart_default=None)
    live.set_defaults(func=run_live)


def run_live(args: argparse.Namespace) -> int:
    from services.cli.economics import _charts, _print  # (that module registers this one)

    entries, stream_last = asyncio.run(_read(args.nats_url, args.timeout_s))
    meta = entries.meta
    prices = _prices(args.prices, meta)
    window = live_window(entries.buckets, entries.uptimes, now=time.time(), since=args.since,
                         until=args.until, tz=args.timezone)
    if window is None:
        raise CliError(f"the ledger at {args.nats_url} holds no usage or occupancy in that span "
                       "yet (is a ledger running? `epserve up` starts one)")
    gpus_per_node = args.gpus_per_node or int(meta.get("gpus_per_node", 8))
    if gpus_per_node < 1:
        raise CliError("--gpus-per-node must be >= 1")
    usage = live_usage(entries.buckets, entries.uptimes, window, tenant=args.tenant,
                       usd_per_gpu_hour=args.usd_per_gpu_hour if args.usd_per_gpu_hour is not None
                       else _decimal(str(meta.get("usd_per_device_hour", "2"))),
                       gpus_per_node=gpus_per_node)
    for model in usage.models:
        if model not in prices.models:
            fallback = meta.get("price_as", "")
            if not fallback or fallback not in prices.models:
                where = prices.source or "the price table"
                raise CliError(f"no price for model {model!r} in {where} "
                               f"(it prices {', '.join(sorted(prices.models))})")
            prices = prices.with_alias(model, fallback)
            usage = replace(usage, notes=(*usage.notes, f"{model} is billed at {fallback} "
                                                        "prices"))
    report = compute_report(usage, prices, spread=args.spread)
    charts = _charts(args, report, usage, "live", "Live cluster")
    folded = sum(b.records for b in entries.buckets)
    ledger = {"cursor": entries.cursor, "usage_stream_last_seq": stream_last,
              "records_billed": folded, "records_not_yet_folded": max(stream_last
                                                                       - entries.cursor, 0)}
    return _print(args, {**views.report_json(report, charts), "ledger": ledger},
                  lambda: views.render_report(report, hours=True, charts=charts)
                  + f"\nledger: {folded} request(s) billed, stream sequence {entries.cursor} of "
                    f"{stream_last} folded")


async def _read(url: str, timeout_s: float) -> tuple[LedgerEntries, int]:
    try:
        nc = await asyncio.wait_for(connect(url, "economics-live", timeout=timeout_s),
                                    timeout_s + 1)
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
        return entries, last
    finally:
        try:
            await asyncio.wait_for(nc.close(), timeout_s)
        except Exception:
            pass


def _prices(path: Path | None, meta: dict) -> PriceTable:
    if path is not None:
        return load_prices(path)
    if meta.get("prices_text"):
        return prices_from_text(meta["prices_text"], meta.get("prices_suffix", ".yaml"),
                                meta.get("prices_source", "the ledger's price table"))
    return load_prices(None)


def _instant(text: str) -> datetime:
    if match := _SPAN.match(text.strip()):
        return datetime.now(UTC) - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO date-time or a span such as 2h: {text!r}") from None
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def _decimal(text: str):
    from services.cli.economics import _decimal_arg

    return _decimal_arg(text)
