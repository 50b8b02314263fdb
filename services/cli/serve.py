"""`epserve serve <service>`: run one service process in the foreground.

Each service module exposes a settings dataclass and `async serve(cfg) -> int`; every setting
is a flag and an EPSERVE_* environment variable (services/common/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib

from services.common.errors import CliError
from services.common.settings import add_settings_args, settings_from

# service name -> (module with serve(), config module, config class)
SERVICES = {
    "expert-worker": ("services.expert_worker.__main__", "services.expert_worker.config",
                      "ExpertWorkerConfig"),
    "prefill": ("services.prefill.__main__", "services.prefill.config", "PrefillConfig"),
    "decode": ("services.decode.__main__", "services.decode.config", "DecodeConfig"),
    "scheduler": ("services.scheduler.__main__", "services.scheduler.config", "SchedulerConfig"),
    "router": ("services.router.__main__", "services.router.config", "RouterConfig"),
    "ledger": ("services.ledger.__main__", "services.ledger.config", "LedgerConfig"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run one epserve service")
    sub = p.add_subparsers(dest="service", required=True)
    for name, (_, cfg_module, cfg_class) in SERVICES.items():
        sp = sub.add_parser(name, help=f"run the {name} service")
        add_settings_args(sp, getattr(importlib.import_module(cfg_module), cfg_class))
        sp.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    module, cfg_module, cfg_class = SERVICES[args.service]
    try:
        cfg = settings_from(getattr(importlib.import_module(cfg_module), cfg_class), args)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return asyncio.run(importlib.import_module(module).serve(cfg))
