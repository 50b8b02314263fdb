"""configure_logging / bind_request: JSON lines, console on request, bound identity and ids."""

from __future__ import annotations

import io
import json
import logging as stdlib_logging
import threading
from datetime import datetime

import pytest
import structlog
from structlog.testing import capture_logs

from services.common.logging import bind_request, configure_logging


@pytest.fixture(autouse=True)
def restore_structlog():
    saved = structlog.get_config()
    saved_handlers = list(stdlib_logging.getLogger().handlers)
    saved_level = stdlib_logging.getLogger().level
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()
    root = stdlib_logging.getLogger()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_line_carries_event_level_timestamp_service_and_rank():
    out = io.StringIO()
    configure_logging("decode", rank=3, stream=out)  # a StringIO is no TTY -> JSON
    structlog.get_logger().info("batch_scheduled", phase="decode", seqs=4)
    (record,) = json_lines(out)
    assert record["event"] == "batch_scheduled"
    assert record["level"] == "info"
    assert (record["phase"], record["seqs"]) == ("decode", 4)
    assert (record["service"], record["rank"]) == ("decode", 3)
    assert datetime.fromisoformat(record["timestamp"]).tzinfo is not None


def test_bind_request_adds_request_id_inside_the_block_only():
    out = io.StringIO()
    configure_logging("router", stream=out)
    log = structlog.get_logger()
    with bind_request("req-1", tenant="t9"):
        log.info("request_admitted")
        with bind_request("req-2"):
            log.info("nested")
        log.info("back_to_outer")
    log.info("after")
    records = {r["event"]: r for r in json_lines(out)}
    assert records["request_admitted"]["request_id"] == "req-1"
    assert records["request_admitted"]["tenant"] == "t9"
    assert records["nested"]["request_id"] == "req-2"
    assert records["back_to_outer"]["request_id"] == "req-1"
    assert "request_id" not in records["after"]
    assert "rank" not in records["after"]  # no rank given, none invented


def test_capture_logs_sees_bound_request_id_with_merge_contextvars():
    configure_logging("prefill", rank=0, stream=io.StringIO())
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        with bind_request("abc"):
            structlog.get_logger("x").warning("kv_stream_slow", ms=12)
    assert logs == [
        {
            "event": "kv_stream_slow",
            "ms": 12,
            "log_level": "warning",
            "service": "prefill",
            "rank": 0,
            "request_id": "abc",
        }
    ]


def test_level_filters_lower_events():
    out = io.StringIO()
    configure_logging("scheduler", level="warning", stream=out)
    log = structlog.get_logger()
    log.info("hidden")
    log.warning("shown")
    assert [r["event"] for r in json_lines(out)] == ["shown"]


def test_console_renderer_when_json_is_false():
    out = io.StringIO()
    configure_logging("router", json=False, stream=out)
    structlog.get_logger().info("console_event", answer=42)
    text = out.getvalue()
    assert "console_event" in text and "answer=42" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_threads_get_service_identity_without_contextvars():
    out = io.StringIO()
    configure_logging("expert-worker", rank=7, stream=out)
    worker = threading.Thread(target=lambda: structlog.get_logger().info("from_thread"))
    worker.start()
    worker.join(timeout=5)
    (record,) = json_lines(out)
    assert (record["service"], record["rank"]) == ("expert-worker", 7)


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="log level"):
        configure_logging("router", level="loud", stream=io.StringIO())
