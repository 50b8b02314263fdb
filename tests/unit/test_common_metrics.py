"""The /metrics endpoint and the scraper, on a private registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics_http import (
    parse_metrics,
    sample_key,
    scrape_metrics,
    start_metrics_http,
    stop_metrics_http,
)


def test_sample_key_sorts_labels():
    assert sample_key("x", {}) == "x"
    assert sample_key("x", {"b": "2", "a": "1"}) == 'x{a="1",b="2"}'


def test_parse_metrics_reads_each_sample():
    text = (
        "# HELP tokens_total Tokens.\n# TYPE tokens_total counter\n"
        'tokens_total{phase="decode"} 7.0\n'
        "# HELP queue Queue depth.\n# TYPE queue gauge\nqueue 3.0\n"
    )
    assert parse_metrics(text) == {'tokens_total{phase="decode"}': 7.0, "queue": 3.0}


def test_endpoint_serves_registry_and_scraper_reads_it():
    registry = CollectorRegistry()
    tokens = Counter("epserve_tokens", "Tokens.", ["phase"], registry=registry)
    Gauge("epserve_queue_depth", "Queue depth.", registry=registry).set(5)
    latency = Histogram("epserve_step_seconds", "Step.", buckets=(0.1, 1.0), registry=registry)
    tokens.labels(phase="decode").inc(3)
    latency.observe(0.5)

    port = start_metrics_http(0, host="127.0.0.1", registry=registry)
    try:
        assert port > 0
        samples = scrape_metrics(f"http://127.0.0.1:{port}/metrics")
    finally:
        stop_metrics_http(port)
    assert samples['epserve_tokens_total{phase="decode"}'] == 3.0
    assert samples["epserve_queue_depth"] == 5.0
    assert samples['epserve_step_seconds_bucket{le="0.1"}'] == 0.0
    assert samples['epserve_step_seconds_bucket{le="1.0"}'] == 1.0
    assert samples["epserve_step_seconds_count"] == 1.0
    with pytest.raises(OSError):
        scrape_metrics(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
