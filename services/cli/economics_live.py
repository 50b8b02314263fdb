"""`epserve economics live`: DeepSeek's cost / revenue / margin table for the running cluster.

The ledger's entries (services/ledger/report.py) computed with the offline report's code: the
same text, `--json` fields (plus `ledger`: how far it has folded the usage stream) and charts
as `economics report`. Prices: `--prices FILE`, else the table the ledger bills with;
cost: `--usd-per-gpu-hour`, else the ledger's `--usd-per-device-hour`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from datetime import UTC, datetime, timedelta

from services.common.errors import CliError
from services.common.mesh_tls import TLS_DIR_ENV, TLS_DIR_HELP
from services.economics import views
from services.economics.window import zone
from services.ledger.report import live_report, read_live

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
    live.add_argument("--tls-dir", default=os.environ.get(TLS_DIR_ENV, ""), help=TLS_DIR_HELP)
    common(live, chart_default=None)
    live.set_defaults(func=run_live)


def run_live(args: argparse.Namespace) -> int:
    from services.cli.economics import _charts, _print  # (that module registers this one)

    ledger = asyncio.run(read_live(args.nats_url, args.timeout_s, args.tls_dir))
    built = live_report(ledger.entries, now=time.time(), prices_path=args.prices,
                        since=args.since, until=args.until, tz=args.timezone, tenant=args.tenant,
                        usd_per_gpu_hour=args.usd_per_gpu_hour, gpus_per_node=args.gpus_per_node,
                        spread=args.spread)
    if built is None:
        raise CliError(f"the ledger at {args.nats_url} holds no usage or occupancy in that span "
                       "yet (is a ledger running? `epserve up` starts one)")
    report, usage = built
    charts = _charts(args, report, usage, "live", "Live cluster")
    s = ledger.summary()
    return _print(args, {**views.report_json(report, charts), "ledger": s},
                  lambda: views.render_report(report, hours=True, charts=charts)
                  + f"\nledger: {s['records_billed']} request(s) billed; usage stream sequence "
                    f"{s['cursor']} of {s['usage_stream_last_seq']} folded")


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
