"""Page files on a local (or shared) disk, kept within a byte budget: the package's only I/O.

Layout: root/ab/cd/<64-hex key>.page, the first two key bytes as two directory levels, so
that millions of pages never sit in one directory; root/quarantine/ holds damaged files for a
post-mortem.

Crash safety: a page is written to a temporary name in its final directory (unique per
process and thread), fsynced, renamed over the final name (atomic) and the directory fsynced.
A SIGKILL at any point leaves at most a stale *.tmp file, which scan() deletes once it is old
enough not to belong to a live writer; a file under a final name is always whole. Reads
verify every byte anyway (page_file.decode_page), so a page damaged later is a miss, moved
to quarantine and counted, never loaded.

Several prefill instances may share one root. Each keeps its own index (what it believes is
resident) and evicts to its own budget; a page another instance wrote is found by checking
the file, and rescan_if_due() refreshes the index. A file that vanished under us is a miss.

Locks: `_lock` guards the index and is never held across file I/O other than a stat, so a
lookup never waits behind another thread's fsync; `_evict_lock` lets one thread evict at a
time; `_scan_lock` one scan. The prefix closure rests on two rules: a page written or adopted
enters the index only while its parent is in it (checked under `_lock`), and eviction takes a
page out of the index (under `_lock`, only while it has no children) before it removes the
file. A scan indexes what the disk holds, orphans included (the children of a quarantined
page): they are leaves, so eviction may take them like any other, and rewriting the missing
page makes them useful again.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from services.prefix_cache import metrics
from services.prefix_cache.index import PageIndex
from services.prefix_cache.keys import KEY_BYTES, NO_PARENT
from services.prefix_cache.page_file import (
    HEADER_SIZE,
    CorruptPage,
    decode_page,
    encode_page,
    read_header,
)

log = structlog.get_logger("prefix_cache")

QUARANTINE_DIR = "quarantine"
QUARANTINE_KEEP = 64  # damaged files kept for a post-mortem; older ones are deleted
MAX_CHAIN_PAGES = 1 << 16  # 4M tokens: longer than any context
STALE_TMP_S = 60.0  # a *.tmp file this old belongs to no live writer
_HEX = frozenset("0123456789abcdef")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse a directory fsync; the file itself was fsynced
    finally:
        os.close(fd)


def _is_shard(name: str) -> bool:
    return len(name) == 2 and set(name) <= _HEX


class DiskPageStore:
    def __init__(self, root: Path, budget_bytes: int, namespace: bytes, *,
                 scan_on_start: bool = False, clock: Callable[[], float] = time.time,
                 read_delay_s: float = 0.0) -> None:
        """Call scan() (or pass scan_on_start) at start to index the pages already on disk:
        until then only the pages this instance writes or reads count against the budget.
        `clock` gives wall-clock seconds: last uses are compared with file mtimes.
        `read_delay_s` is fault injection (a slow store: every page read takes this long
        more), for the benchmark that checks a slow disk never makes a hit slower."""
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        if len(namespace) != KEY_BYTES:
            raise ValueError(f"namespace must be {KEY_BYTES} bytes")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.namespace = namespace
        self._clock = clock
        self.read_delay_s = read_delay_s
        self._index = PageIndex()
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._removed_during_scan: set[bytes] | None = None
        self._last_scan: float | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        if scan_on_start:
            self.scan()

    # -- queries ---------------------------------------------------------------------------

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[0:2] / h[2:4] / f"{h}.page"

    def contains(self, key: bytes) -> bool:
        with self._lock:
            if key in self._index:
                return True
        return self.path(key).is_file()

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._index.total_bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def index(self) -> PageIndex:
        """This instance's view of the directory, for counts (len); change it only through
        the store, which holds the lock."""
        return self._index

    def indexed_keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    # -- write -----------------------------------------------------------------------------

    def write(self, key: bytes, parent: bytes, token_count: int, payload: bytes) -> bool:
        """Store one page; False when skipped: already resident, parent not resident (a chain
        whose head was evicted is useless) or a disk error (logged, counted)."""
        if self._adopt(key) or self.path(key).is_file():
            metrics.WRITES_SKIPPED.labels(reason="resident").inc()
            return False
        if parent != NO_PARENT and not self._adopt(parent):
            metrics.WRITES_SKIPPED.labels(reason="orphan").inc()
            return False
        data = encode_page(key, parent, self.namespace, token_count, payload)
        path = self.path(key)
        try:
            self._write_atomically(path, data)
        except OSError as exc:
            log.warning("page_write_failed", key=key.hex(), error=str(exc))
            metrics.WRITES_SKIPPED.labels(reason="error").inc()
            return False
        with self._lock:
            # Eviction may have taken the parent while we wrote; a written page enters the
            # index only with its parent, so this one goes too.
            orphan = parent != NO_PARENT and parent not in self._index
            if not orphan:
                self._add(key, parent, len(data), self._clock())
        if orphan:
            self._unlink(path)
            metrics.WRITES_SKIPPED.labels(reason="orphan").inc()
            return False
        metrics.BYTES_WRITTEN.inc(len(data))
        metrics.PAGES_WRITTEN.inc()
        self.evict()
        return True

    def _write_atomically(self, path: Path, data: bytes) -> None:
        directory = path.parent
        self._ensure_dir(directory)
        tmp = directory / (f".{path.stem}.{os.getpid()}.{threading.get_ident()}"
                           f".{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            self._unlink(tmp, quiet=True)
            raise
        _fsync_dir(directory)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        os.makedirs(directory, exist_ok=True)
        # The new directory entries must survive a power cut for the page inside to.
        _fsync_dir(directory.parent)
        _fsync_dir(directory.parent.parent)

    # -- read ------------------------------------------------------------------------------

    def read(self, key: bytes) -> bytes | None:
        """The verified payload, or None: missing, or damaged (quarantined and counted)."""
        path = self.path(key)
        start = time.perf_counter()
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            with self._lock:
                self._forget(key)  # evicted here or by another instance
            return None
        except OSError as exc:
            self.discard(key, "io", detail=str(exc))
            return None
        try:
            header, payload = decode_page(data, key, self.namespace)
        except CorruptPage as exc:
            self.discard(key, exc.reason, detail=str(exc))
            return None
        metrics.READ_SECONDS.inc(time.perf_counter() - start)
        metrics.BYTES_READ.inc(len(data))
        metrics.PAGES_READ.inc()
        now = self._clock()
        with self._lock:
            if not self._index.touch(key, now) and (
                    header.parent == NO_PARENT or header.parent in self._index):
                self._add(key, header.parent, len(data), now)  # written by another instance
        try:
            os.utime(path)  # the mtime is the last use that scans (ours, others') see
        except OSError:
            pass
        return payload

    def discard(self, key: bytes, reason: str, detail: str = "") -> None:
        """A page that must not be used: out of the index, into quarantine, counted."""
        metrics.CORRUPT_PAGES.labels(reason=reason).inc()
        log.warning("page_corrupt", key=key.hex(), reason=reason, detail=detail)
        with self._lock:
            self._forget(key)
        path = self.path(key)
        quarantine = self.root / QUARANTINE_DIR
        target = quarantine / f"{key.hex()}.{reason}.{os.getpid()}.{secrets.token_hex(4)}.bad"
        try:
            quarantine.mkdir(exist_ok=True)
            os.replace(path, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("page_quarantine_failed", key=key.hex(), error=str(exc))
            self._unlink(path)
            return
        self._trim_quarantine(quarantine)

    def _trim_quarantine(self, quarantine: Path) -> None:
        try:
            files = sorted(quarantine.iterdir(), key=lambda p: p.stat().st_mtime)
        except OSError:
            return  # a file vanished while sorting (another instance trims too): next time
        for old in files[:max(len(files) - QUARANTINE_KEEP, 0)]:
            self._unlink(old)

    # -- eviction --------------------------------------------------------------------------

    def evict(self) -> int:
        """Remove least recently used leaves until within budget; returns pages removed. A
        file that cannot be removed is skipped (logged, counted) and stays indexed, since it
        still takes space; its ancestors stay too, keeping the prefix closure."""
        removed = 0
        stuck: set[bytes] = set()
        with self._evict_lock:
            # Each round removes a page or gives one up, unless writers race it; then the
            # next write's eviction carries on.
            for _ in range(len(self) + 1):
                with self._lock:
                    victims = self._index.victims(self.budget_bytes, exclude=stuck)
                if not victims:
                    break
                for key in victims:
                    with self._lock:
                        if key not in self._index or self._index.children_count(key):
                            continue  # a child was written meanwhile, or could not be removed
                        entry = (key, self._index.parent(key), self._index.nbytes(key),
                                 self._index.last_use(key))
                        self._forget(key)
                    if self._unlink(self.path(key)):
                        removed += 1
                        metrics.EVICTIONS.inc()
                    else:
                        stuck.add(key)
                        with self._lock:
                            self._add(*entry)
        self._update_gauge()
        return removed

    def _unlink(self, path: Path, quiet: bool = False) -> bool:
        try:
            os.remove(path)
        except FileNotFoundError:
            return True  # another instance removed it: just as good
        except OSError as exc:
            if not quiet:
                log.warning("page_remove_failed", path=str(path), error=str(exc))
                metrics.REMOVE_ERRORS.inc()
            return False
        return True

    # -- scans -----------------------------------------------------------------------------

    def scan(self, stale_tmp_s: float = STALE_TMP_S) -> int:
        """Rebuild the index from the directory (headers only; the mtime is the last use),
        quarantine unreadable pages, delete *.tmp files older than `stale_tmp_s`, then evict
        to the budget. Returns the pages indexed."""
        with self._scan_lock:
            started = self._clock()
            with self._lock:
                self._removed_during_scan = set()
            found: dict[bytes, tuple[bytes, int, float]] = {}
            try:
                for directory in self._shard_dirs():
                    self._scan_dir(directory, found, started, stale_tmp_s)
            finally:
                with self._lock:
                    removed, self._removed_during_scan = self._removed_during_scan, None
                    self._index.reconcile(found, started, removed)
                    self._last_scan = started
        self.evict()
        log.info("prefix_cache_scanned", root=str(self.root), pages=len(found),
                 resident_bytes=self.total_bytes)
        return len(found)

    def rescan_if_due(self, now: float, every_s: float) -> bool:
        """Scan when the last scan is `every_s` old (`now`: wall-clock seconds, time.time()),
        to see what the other instances sharing the directory wrote and removed."""
        with self._lock:
            due = self._last_scan is None or now - self._last_scan >= every_s
        if due:
            self.scan()
        return due

    def _shard_dirs(self) -> list[Path]:
        out = []
        for top in sorted(p for p in self.root.iterdir() if p.is_dir() and _is_shard(p.name)):
            out.extend(sorted(p for p in top.iterdir() if p.is_dir() and _is_shard(p.name)))
        return out

    def _scan_dir(self, directory: Path, found: dict, started: float, stale_tmp_s: float) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return  # removed by another instance meanwhile
        for entry in entries:
            name = entry.name
            if name.endswith(".tmp"):
                try:
                    age = started - entry.stat().st_mtime
                except OSError:
                    continue
                if age >= stale_tmp_s:
                    log.info("stale_tmp_removed", path=entry.path)
                    self._unlink(Path(entry.path))
                continue
            hexkey = name.removesuffix(".page")
            if (hexkey == name or len(hexkey) != 2 * KEY_BYTES or not set(hexkey) <= _HEX
                    or directory.name != hexkey[2:4] or directory.parent.name != hexkey[0:2]):
                continue  # not a page file of this layout
            key = bytes.fromhex(hexkey)
            probe = self._probe(key)
            if probe is not None:
                found[key] = probe

    def _probe(self, key: bytes) -> tuple[bytes, int, float] | None:
        """(parent, size, mtime) of a page file from its header; None when missing, of
        another namespace, or damaged (then quarantined)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(HEADER_SIZE)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.discard(key, "io", detail=str(exc))
            return None
        try:
            header = read_header(head)
        except CorruptPage as exc:
            self.discard(key, exc.reason)
            return None
        if header.namespace != self.namespace:
            return None  # another model's page in a shared directory: not ours to judge
        if header.key != key:
            self.discard(key, "key")
            return None
        if header.file_size != st.st_size:
            self.discard(key, "short" if st.st_size < header.file_size else "length")
            return None
        return header.parent, st.st_size, st.st_mtime

    # -- the index, under _lock ------------------------------------------------------------

    def _adopt(self, key: bytes) -> bool:
        """Whether the page is in the index after the call: it was, or it is a valid file
        (another instance wrote it) whose ancestors are indexed or valid files too; the
        chain is adopted from its first page down (an instance storing page 4 of a prompt
        whose pages 0-3 another instance wrote adopts all four)."""
        chain: list[tuple[bytes, bytes, int, float]] = []
        at = key
        for _ in range(MAX_CHAIN_PAGES):
            with self._lock:
                if at in self._index:
                    break
            probe = self._probe(at)
            if probe is None:
                return False
            parent, size, mtime = probe
            chain.append((at, parent, size, mtime))
            if parent == NO_PARENT:
                break
            at = parent
        else:
            return False
        with self._lock:
            for page, parent, size, mtime in reversed(chain):
                if page not in self._index and (parent == NO_PARENT or parent in self._index):
                    self._add(page, parent, size, mtime)
            return key in self._index

    def _add(self, key: bytes, parent: bytes, nbytes: int, now: float) -> None:
        self._index.add(key, parent, nbytes, now)
        if self._removed_during_scan is not None:
            self._removed_during_scan.discard(key)

    def _forget(self, key: bytes) -> None:
        self._index.remove(key)
        if self._removed_during_scan is not None:
            self._removed_during_scan.add(key)

    def _update_gauge(self) -> None:
        metrics.RESIDENT_BYTES.labels(tier="disk").set(self.total_bytes)
