"""The router's on-disk usage spool: records JetStream did not acknowledge yet, oldest first.

Layout in the spool directory:

- `usage-<gen>.spool`: append-only; each record is an 8-byte header (big-endian uint32
  length, uint32 CRC-32 of the payload) followed by the serialized UsageRecord. Every append
  is fsync'd before `append` returns.
- `head`: "<gen> <offset>", replaced atomically (write, fsync, rename, fsync the directory):
  the live file and the byte offset of its oldest record not yet acknowledged.

Removing acknowledged (or, when full, the oldest dropped) records only moves the head; when
the dead prefix is large (or the spool empties) the live records are copied into generation
gen+1, which becomes live with one atomic head write. A crash at any point leaves either the
old or the new generation live (a stray file of the other one is deleted at the next open),
and a torn last record (a crash mid-append) is cut off. A record acknowledged but not yet
removed when the process died is sent again by the next one; JetStream drops the duplicate on
its Nats-Msg-Id. The spool is bounded by a record count: appending to a full spool drops the
oldest record. Thread-safe (one lock): the publisher calls it from worker threads.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import deque
from pathlib import Path

import structlog

HEADER = struct.Struct(">II")  # payload length, CRC-32 of the payload
MAX_RECORD_BYTES = 1 << 20  # a usage record is ~200 bytes; larger is corruption
COMPACT_MIN_BYTES = 1 << 20  # rewrite once the dead prefix is this large and >= the live part
HEAD_NAME = "head"

log = structlog.get_logger("router.usage_spool")


def _spool_name(gen: int) -> str:
    return f"usage-{gen}.spool"


class UsageSpool:
    def __init__(self, directory: str | Path, max_records: int = 100_000) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        self.directory = Path(directory)
        self.max_records = max_records
        self._lock = threading.Lock()
        # (sequence number, payload, byte length on disk incl. header), oldest first
        self._records: deque[tuple[int, bytes, int]] = deque()
        self._next_seq = 0
        self._live_bytes = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._gen, self._head = self._read_head()
        self._file = None
        self._load()

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def peek(self, n: int) -> list[tuple[int, bytes]]:
        """Up to `n` oldest records as (sequence number, payload)."""
        with self._lock:
            return [(seq, data) for seq, data, _ in list(self._records)[:n]]

    @property
    def path(self) -> Path:
        return self.directory / _spool_name(self._gen)

    # -- writing ---------------------------------------------------------------------------

    def append(self, data: bytes) -> int:
        """Appends one record (fsync'd); returns how many old records were dropped to make
        room (0 or 1)."""
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        with self._lock:
            dropped = 0
            while len(self._records) >= self.max_records:
                self._drop_oldest()
                dropped += 1
            if dropped:
                self._write_head()
            frame = HEADER.pack(len(data), zlib.crc32(data)) + data
            self._file.write(frame)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._records.append((self._next_seq, data, len(frame)))
            self._next_seq += 1
            self._live_bytes += len(frame)
            self._maybe_compact()
            return dropped

    def ack(self, upto_seq: int) -> int:
        """Removes every record with a sequence number <= `upto_seq`; how many it removed."""
        with self._lock:
            removed = 0
            while self._records and self._records[0][0] <= upto_seq:
                self._drop_oldest()
                removed += 1
            if removed:
                self._write_head()
                self._maybe_compact()
            return removed

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- internals (called with the lock held, or from __init__) ----------------------------

    def _drop_oldest(self) -> None:
        _seq, _data, size = self._records.popleft()
        self._head += size
        self._live_bytes -= size

    def _maybe_compact(self) -> None:
        if self._head == 0:
            return
        if self._records and (self._head < COMPACT_MIN_BYTES or self._head < self._live_bytes):
            return
        new_gen = self._gen + 1
        new_path = self.directory / _spool_name(new_gen)
        with open(new_path, "wb") as out:
            for _seq, data, _size in self._records:
                out.write(HEADER.pack(len(data), zlib.crc32(data)) + data)
            out.flush()
            os.fsync(out.fileno())
        old_path, old_file = self.path, self._file
        self._gen, self._head = new_gen, 0
        self._write_head()  # the switch: from here on the new generation is the live one
        self._file = open(new_path, "ab")
        if old_file is not None:
            old_file.close()
        old_path.unlink(missing_ok=True)

    def _read_head(self) -> tuple[int, int]:
        try:
            gen_text, offset_text = (self.directory / HEAD_NAME).read_text().split()
            return int(gen_text), int(offset_text)
        except FileNotFoundError:
            return 0, 0
        except ValueError:
            log.warning("usage_spool_head_unreadable", directory=str(self.directory))
            return 0, 0

    def _write_head(self) -> None:
        tmp = self.directory / (HEAD_NAME + ".tmp")
        with open(tmp, "w") as out:
            out.write(f"{self._gen} {self._head}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.directory / HEAD_NAME)
        _fsync_dir(self.directory)

    def _load(self) -> None:
        live = self.path
        for stray in self.directory.glob("usage-*.spool"):
            if stray != live:  # an unfinished compaction, or an old generation
                stray.unlink(missing_ok=True)
        good_end = self._head
        if live.exists():
            blob = live.read_bytes()
            if self._head > len(blob):
                log.warning("usage_spool_head_past_end", head=self._head, size=len(blob))
                self._head = good_end = len(blob)
            pos = self._head
            while pos + HEADER.size <= len(blob):
                length, crc = HEADER.unpack_from(blob, pos)
                end = pos + HEADER.size + length
                if length > MAX_RECORD_BYTES or end > len(blob):
                    break
                data = blob[pos + HEADER.size:end]
                if zlib.crc32(data) != crc:
                    break
                self._records.append((self._next_seq, data, end - pos))
                self._next_seq += 1
                self._live_bytes += end - pos
                pos = good_end = end
            if good_end < len(blob):
                log.warning("usage_spool_torn_tail", cut_bytes=len(blob) - good_end)
                with open(live, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
        self._file = open(live, "ab")
        self.dropped_at_load = 0
        while len(self._records) > self.max_records:  # a smaller bound than the last process
            self._drop_oldest()
            self.dropped_at_load += 1
        if self.dropped_at_load:
            log.warning("usage_spool_over_bound", dropped=self.dropped_at_load)
        self._write_head()
        if self._records:
            log.info("usage_spool_loaded", records=len(self._records), path=str(live))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
