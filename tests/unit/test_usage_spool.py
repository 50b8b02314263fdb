"""The router's on-disk usage spool: append-only, fsync'd, bounded, crash-tolerant."""

from __future__ import annotations

import struct

import pytest

from services.router import usage_spool
from services.router.usage_spool import HEADER, UsageSpool


def payloads(spool: UsageSpool) -> list[bytes]:
    return [data for _, data in spool.peek(len(spool) + 1)]


def test_records_come_back_in_order_after_a_reopen(tmp_path):
    spool = UsageSpool(tmp_path, max_records=10)
    for i in range(4):
        assert spool.append(b"rec-%d" % i) == 0
    [(seq0, _), (seq1, _)] = spool.peek(2)
    assert spool.ack(seq1) == 2  # removed only what was acknowledged
    spool.append(b"rec-4")
    spool.close()

    again = UsageSpool(tmp_path, max_records=10)
    assert payloads(again) == [b"rec-2", b"rec-3", b"rec-4"]
    raw = again.path.read_bytes()
    length, _crc = HEADER.unpack_from(raw, 0)  # length-prefixed frames
    assert raw[HEADER.size:HEADER.size + length] == b"rec-0"  # the head moved, not the file
    again.close()


def test_full_spool_drops_the_oldest(tmp_path):
    spool = UsageSpool(tmp_path, max_records=3)
    dropped = [spool.append(b"r%d" % i) for i in range(5)]
    assert dropped == [0, 0, 0, 1, 1]
    assert len(spool) == 3 and payloads(spool) == [b"r2", b"r3", b"r4"]
    spool.close()
    assert payloads(UsageSpool(tmp_path, max_records=3)) == [b"r2", b"r3", b"r4"]
    smaller = UsageSpool(tmp_path, max_records=2)  # a smaller bound than last time
    assert payloads(smaller) == [b"r3", b"r4"] and smaller.dropped_at_load == 1
    with pytest.raises(ValueError):
        UsageSpool(tmp_path / "x", max_records=0)


def test_a_torn_or_corrupt_tail_is_cut_off(tmp_path):
    spool = UsageSpool(tmp_path)
    spool.append(b"good-1")
    spool.append(b"good-2")
    path = spool.path
    spool.close()
    with open(path, "ab") as f:  # a crash mid-append: a header without its whole payload
        f.write(struct.pack(">II", 100, 0) + b"part")
    again = UsageSpool(tmp_path)
    assert payloads(again) == [b"good-1", b"good-2"]
    again.append(b"good-3")
    again.close()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last payload no longer matches its CRC
    path.write_bytes(bytes(raw))
    assert payloads(UsageSpool(tmp_path)) == [b"good-1", b"good-2"]


def test_an_emptied_spool_starts_a_new_generation(tmp_path):
    spool = UsageSpool(tmp_path)
    first = spool.path
    for i in range(3):
        spool.append(b"x%d" % i)
    spool.ack(spool.peek(3)[-1][0])
    assert len(spool) == 0 and spool.path != first and not first.exists()
    assert spool.path.stat().st_size == 0
    spool.append(b"after")
    spool.close()
    (tmp_path / "usage-99.spool").write_bytes(b"junk of an unfinished compaction")
    again = UsageSpool(tmp_path)
    assert payloads(again) == [b"after"]
    assert sorted(p.name for p in tmp_path.glob("usage-*.spool")) == [again.path.name]


def test_a_large_dead_prefix_is_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(usage_spool, "COMPACT_MIN_BYTES", 64)
    spool = UsageSpool(tmp_path)
    for i in range(20):
        spool.append(b"record-%02d" % i)
    gen0 = spool.path
    spool.ack(spool.peek(12)[-1][0])  # 12 dead records > 8 live ones, and > 64 bytes
    assert spool.path != gen0 and not gen0.exists()
    assert payloads(spool) == [b"record-%02d" % i for i in range(12, 20)]
    spool.close()
    assert payloads(UsageSpool(tmp_path)) == [b"record-%02d" % i for i in range(12, 20)]


def test_oversized_records_are_refused(tmp_path):
    spool = UsageSpool(tmp_path)
    with pytest.raises(ValueError):
        spool.append(b"x" * (usage_spool.MAX_RECORD_BYTES + 1))
    assert len(spool) == 0
