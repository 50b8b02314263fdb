"""Argument parsing of `epserve nats-server` and `epserve link-proxy` (register on a parser)."""

from __future__ import annotations

import argparse

import pytest

from services.cli.local import host_port, register, run_link_proxy, run_nats_server


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="epserve")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_link_proxy_arguments():
    args = parse(
        ["link-proxy", "--listen", "0.0.0.0:9000", "--upstream", "expert-0:50051",
         "--latency-ms", "2.5", "--bandwidth-mbps", "400", "--control-port", "0"]
    )  # fmt: skip
    assert args.func is run_link_proxy
    assert args.listen == ("0.0.0.0", 9000) and args.upstream == ("expert-0", 50051)
    assert (args.latency_ms, args.bandwidth_mbps, args.control_port) == (2.5, 400.0, 0)


def test_nats_server_defaults():
    args = parse(["nats-server"])
    assert args.func is run_nats_server
    assert (args.host, args.port, args.store_dir, args.monitor_port) == (
        "127.0.0.1",
        4222,
        None,
        None,
    )


@pytest.mark.parametrize("text", ["9000", ":9000", "host:", "host:port", "host:70000"])
def test_host_port_rejects_malformed(text):
    with pytest.raises(argparse.ArgumentTypeError):
        host_port(text)


def test_missing_upstream_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        parse(["link-proxy", "--listen", "127.0.0.1:0"])
    assert info.value.code == 2
