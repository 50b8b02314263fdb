"""UsageRecord is the protobuf's record: same fields, proto round trips, JSONL with the same names."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import CliError
from services.economics.files import load_prices, load_records
from services.economics.metering import UsageRecord, aggregate_records
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


def test_jsonl_records_use_the_protobuf_field_names(tmp_path):
    msg = message()
    line = {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
    later = {"model": "deepseek-v3", "started_at": msg.started_at + 3600,
             "prompt_cache_miss_tokens": 10, "completion_tokens": 5}
    path = tmp_path / "usage.jsonl"
    path.write_text(json.dumps(line) + "\n\n" + json.dumps(later) + "\n")
    records = load_records(path)
    assert records[0] == UsageRecord.from_proto(msg)
    assert records[1].started_at == records[0].started_at + timedelta(hours=1)
    # Records from a file and from JetStream fold into the same aggregation.
    prices = load_prices(None)
    from_file = aggregate_records(records, WINDOW, prices)
    from_proto = aggregate_records([UsageRecord.from_proto(msg), records[1]], WINDOW, prices)
    assert from_file == from_proto and from_file.records == 2


def test_jsonl_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "usage.jsonl"
    path.write_text('{"model": "m", "started_at": 1}\n\n{"model": "m", "started_at": "soon"}\n')
    with pytest.raises(CliError, match=r"line 3\.started_at: must be a number"):
        load_records(path)
    path.write_text('{"model": "m", "started_at": 1}\n{oops\n')
    with pytest.raises(CliError, match="line 2: not valid JSON"):
        load_records(path)
