"""Prometheus `/metrics` over HTTP for each service, and a scraper for tests and the bench."""

from __future__ import annotations

import urllib.request
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

# Servers this process started, by bound port, so that tests can stop them again.
_servers: dict[int, WSGIServer] = {}


def start_metrics_http(
    port: int = 0, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> int:
    """Serves `registry` at http://host:port/metrics from a daemon thread; returns the port.

    `port=0` lets the OS pick a free port. The default host listens on every interface, as a
    Prometheus scraper in another pod needs; tests pass "127.0.0.1".
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    _servers[bound] = server
    return bound


def stop_metrics_http(port: int) -> None:
    """Stops a server that `start_metrics_http` started on `port` (no-op if there is none)."""
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()


def sample_key(name: str, labels: dict[str, str]) -> str:
    """`name{a="1",b="2"}` with labels sorted, or just `name` without labels."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{labels[key]}"' for key in sorted(labels))
    return f"{name}{{{inner}}}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample_key: value}, one entry per sample line.

    Counters appear with their `_total` (and `_created`) samples, histograms with `_bucket`,
    `_count` and `_sum`, exactly as exposed.
    """
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample_key(sample.name, dict(sample.labels))] = float(sample.value)
    return samples


def scrape_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """GETs a `/metrics` URL and parses it with `parse_metrics`."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_metrics(response.read().decode("utf-8"))
