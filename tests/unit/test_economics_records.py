"""UsageRecord is the protobuf's record: same fields, proto round trips, folded into usage rows."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime, timedelta

import pytest

from services.cli.economics import load_prices, load_usage
from services.common.errors import CliError
from services.economics.metering import UsageRecord, aggregate_records
from services.economics.usage import parse_usage
from services.economics.window import Window
from services.protos_gen.epserve.v1 import control_pb2

WINDOW = Window(datetime(2025, 3, 1, 12, tzinfo=UTC), datetime(2025, 3, 2, 12, tzinfo=UTC), UTC)


def message(**overrides) -> control_pb2.UsageRecord:
    values = dict(
        request_id="req-1", model="deepseek-r1", started_at=1740850199.5,  # 2025-03-01 17:29:59.5
        finished_at=1740850210.25, prompt_tokens=3000, prompt_cache_hit_tokens=1000,
        prompt_cache_miss_tokens=2000, completion_tokens=3000, finish_reason="stop",
        prefill_instance="prefill-0", decode_instance="decode-1", time_to_first_token_s=0.125,
        usage_id="u-7", migrations=1)
    return control_pb2.UsageRecord(**{**values, **overrides})


def test_fields_are_the_protobufs():
    proto_fields = [f.name for f in control_pb2.UsageRecord.DESCRIPTOR.fields]
    assert [f.name for f in fields(UsageRecord)] == proto_fields


def test_proto_round_trip():
    msg = message()
    record = UsageRecord.from_proto(msg)
    assert record.started_at == datetime(2025, 3, 1, 17, 29, 59, 500_000, tzinfo=UTC)
    assert record.tokens.input_total == 3000 and record.finish_reason == "stop"
    assert record.to_proto() == msg
    assert UsageRecord.from_proto(record.to_proto()) == record


def test_record_round_trip_keeps_microseconds():
    record = UsageRecord(model="m", started_at=datetime(2025, 3, 1, 16, 30, 0, 123_457, tzinfo=UTC),
                         prompt_cache_hit_tokens=5, completion_tokens=1)
    assert UsageRecord.from_proto(record.to_proto()) == record


def test_unset_proto_fields():
    msg = message(finished_at=0, prompt_tokens=0)
    record = UsageRecord.from_proto(msg)
    assert record.finished_at is None and record.prompt_tokens == 3000  # hit + miss
    assert record.to_proto().finished_at == 0


def test_inconsistent_or_naive_records_are_refused():
    with pytest.raises(ValueError, match="prompt_tokens"):
        UsageRecord.from_proto(message(prompt_tokens=7))
    with pytest.raises(ValueError, match="timezone-aware"):
        UsageRecord(model="m", started_at=datetime(2025, 3, 1))
    with pytest.raises(ValueError):
        UsageRecord(model="", started_at=datetime(2025, 3, 1, tzinfo=UTC))


def test_records_fold_into_the_usage_files_hourly_rows():
    # Records from JetStream fold into hourly buckets, and a usage file carries exactly those
    # buckets as its hourly_tokens rows (the one traffic form): they read back unchanged.
    msg = message()
    later = UsageRecord(model="deepseek-v3", started_at=datetime.fromtimestamp(
        msg.started_at + 3600, UTC), prompt_cache_miss_tokens=10, completion_tokens=5)
    records = [UsageRecord.from_proto(msg), later]
    assert records[1].started_at == records[0].started_at + timedelta(hours=1)
    metered = aggregate_records(records, WINDOW, load_prices(None))
    assert metered.records == 2
    rows = [{"from": WINDOW.at(b.start).isoformat(), "to": WINDOW.at(b.end).isoformat(),
             "model": b.model, "input_cache_hit": b.tokens.input_cache_hit,
             "input_cache_miss": b.tokens.input_cache_miss, "output_total": b.tokens.output}
            for b in metered.buckets]
    usage = parse_usage({
        "window": {"timezone": "UTC", "from": "2025-03-01T12:00", "to": "2025-03-02T12:00"},
        "hardware": {"gpus_per_node": 8, "usd_per_gpu_hour": 2},
        "node_schedule": [{"from": "12:00", "to": "12:00", "nodes": 1}], "hourly_tokens": rows})
    assert usage.traffic == metered.buckets


def test_jsonl_record_files_are_refused_naming_the_file(tmp_path):
    # Per-request JSONL records are not an input form: a usage file carries them folded.
    path = tmp_path / "usage.jsonl"
    path.write_text('{"model": "m", "started_at": 1}\n')
    with pytest.raises(CliError, match=r"usage file .*usage\.jsonl: JSONL usage records are not "
                                       "read; a usage file carries them folded into hourly_tokens"):
        load_usage(path)
