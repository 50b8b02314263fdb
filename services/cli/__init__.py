"""The `epserve` command: one subcommand per feature, each registered by its own module.

A module in COMMAND_MODULES exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int` on each. A `CliError` raised anywhere becomes a one-line message and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from services.common.cpu_cores import apply_from_env
from services.common.errors import CliError
from services.common.logging import configure_logging

COMMAND_MODULES = (
    "services.cli.model",  # make-model
    "services.cli.generate",  # generate
    "services.cli.placement",  # placement
    "services.cli.economics",  # economics report|reproduce|capacity
    "services.cli.serve",  # serve <service>
    "services.cli.up",  # up
    "services.cli.local",  # link-proxy, nats-server
    "services.cli.keys",  # keys create|list|revoke
    "services.cli.certs",  # certs (the mesh CA and per-service certificates)
    "services.cli.train",  # train
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epserve",
        description="Disaggregated, expert-parallel serving for DeepSeek-V3-family models",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # first, before any module below starts a thread: every later thread inherits the mask
    try:
        apply_from_env()
    except (ValueError, OSError) as exc:
        print(f"epserve: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    # Library logs go to stderr, warnings and up, so that stdout carries only a command's own
    # output (`generate --json` stays parseable); `serve` reconfigures for its service.
    configure_logging("epserve", level="warning")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"epserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
