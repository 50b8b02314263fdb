"""DiskPageStore: writes, verified reads, restarts, quarantine, eviction to the budget."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.prefix_cache.disk_store import DiskPageStore
from services.prefix_cache.keys import NO_PARENT, page_keys
from services.prefix_cache.page_file import HEADER_SIZE, decode_page, read_header

NS = hashlib.sha256(b"disk-ns").digest()
PAYLOAD = 1000
FILE = HEADER_SIZE + PAYLOAD


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def chain_keys(seed: int, pages: int) -> list[bytes]:
    return page_keys(NS, [(seed * 1_000_003 + i) % 2**32 for i in range(64 * pages)])


def payload(key: bytes) -> bytes:
    return (key * (PAYLOAD // 32 + 1))[:PAYLOAD]


def write_chain(store: DiskPageStore, keys: list[bytes]) -> int:
    written = 0
    for i, key in enumerate(keys):
        written += store.write(key, keys[i - 1] if i else NO_PARENT, 64, payload(key))
    return written


def page_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.page") if "quarantine" not in p.parts]


def test_write_read_and_layout(tmp_path):
    store = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    keys = chain_keys(1, 3)
    assert write_chain(store, keys) == 3
    h = keys[0].hex()
    assert (tmp_path / h[:2] / h[2:4] / f"{h}.page").is_file()
    assert store.path(keys[0]) == tmp_path / h[:2] / h[2:4] / f"{h}.page"
    assert all(store.read(key) == payload(key) for key in keys)
    assert store.contains(keys[2]) and len(store) == 3 and store.total_bytes == 3 * FILE
    assert not list(tmp_path.rglob("*.tmp"))
    assert store.read(chain_keys(2, 1)[0]) is None


def test_write_skips_resident_and_orphans(tmp_path):
    store = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    keys = chain_keys(1, 3)
    resident = metric("epserve_prefix_cache_writes_skipped_total", reason="resident")
    orphan = metric("epserve_prefix_cache_writes_skipped_total", reason="orphan")
    assert store.write(keys[0], NO_PARENT, 64, payload(keys[0]))
    assert not store.write(keys[0], NO_PARENT, 64, payload(keys[0]))
    assert not store.write(keys[2], keys[1], 64, payload(keys[2]))  # its parent is missing
    assert not store.path(keys[2]).exists()
    assert metric("epserve_prefix_cache_writes_skipped_total", reason="resident") == resident + 1
    assert metric("epserve_prefix_cache_writes_skipped_total", reason="orphan") == orphan + 1


def test_counts_bytes_and_time(tmp_path):
    store = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    keys = chain_keys(1, 2)
    written = metric("epserve_prefix_cache_bytes_written_total")
    read = metric("epserve_prefix_cache_bytes_read_total")
    pages_read = metric("epserve_prefix_cache_pages_read_total")
    seconds = metric("epserve_prefix_cache_read_seconds_total")
    write_chain(store, keys)
    store.read(keys[0])
    store.read(keys[1])
    assert metric("epserve_prefix_cache_bytes_written_total") == written + 2 * FILE
    assert metric("epserve_prefix_cache_bytes_read_total") == read + 2 * FILE
    assert metric("epserve_prefix_cache_pages_read_total") == pages_read + 2
    assert metric("epserve_prefix_cache_read_seconds_total") > seconds
    assert metric("epserve_prefix_cache_resident_bytes", tier="disk") == 2 * FILE


def test_restart_keeps_the_cache(tmp_path):
    keys = chain_keys(1, 4)
    first = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    write_chain(first, keys)
    del first
    second = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    assert len(second) == 0
    assert second.scan() == 4
    assert len(second) == 4 and second.total_bytes == 4 * FILE
    assert [second.read(key) for key in keys] == [payload(key) for key in keys]
    # The parent links survive too: eviction takes the chain from its tail.
    second.budget_bytes = 2 * FILE
    second.evict()
    assert [second.contains(key) for key in keys] == [True, True, False, False]


def test_restart_with_a_smaller_budget_evicts(tmp_path):
    write_chain(DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS), chain_keys(1, 5))
    smaller = DiskPageStore(tmp_path, budget_bytes=3 * FILE, namespace=NS, scan_on_start=True)
    assert smaller.total_bytes <= 3 * FILE and len(page_files(tmp_path)) == 3


def damage(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x55
    path.write_bytes(bytes(data))


def test_corrupt_page_is_a_miss_quarantined_and_counted(tmp_path):
    store = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    keys = chain_keys(1, 2)
    write_chain(store, keys)
    damage(store.path(keys[1]), HEADER_SIZE + 10)
    before = metric("epserve_prefix_cache_corrupt_pages_total", reason="checksum")
    with capture_logs() as logs:
        assert store.read(keys[1]) is None
    assert metric("epserve_prefix_cache_corrupt_pages_total", reason="checksum") == before + 1
    assert not store.path(keys[1]).exists() and not store.contains(keys[1])
    assert [p.name.split(".")[1] for p in (tmp_path / "quarantine").iterdir()] == ["checksum"]
    assert any(e["event"] == "page_corrupt" and e["reason"] == "checksum" for e in logs)
    assert store.read(keys[0]) == payload(keys[0])
    assert store.write(keys[1], keys[0], 64, payload(keys[1]))  # rewritten, usable again
    assert store.read(keys[1]) == payload(keys[1])


def test_swapped_files_are_caught_by_key(tmp_path):
    store = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    a, b = chain_keys(1, 1)[0], chain_keys(2, 1)[0]
    store.write(a, NO_PARENT, 64, payload(a))
    store.write(b, NO_PARENT, 64, payload(b))
    data_a, data_b = store.path(a).read_bytes(), store.path(b).read_bytes()
    store.path(a).write_bytes(data_b)
    store.path(b).write_bytes(data_a)
    before = metric("epserve_prefix_cache_corrupt_pages_total", reason="key")
    assert store.read(a) is None and store.read(b) is None
    assert metric("epserve_prefix_cache_corrupt_pages_total", reason="key") == before + 2


def test_scan_quarantines_bad_headers_and_cleans_stale_tmp(tmp_path):
    store = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    keys = chain_keys(1, 3)
    write_chain(store, keys)
    damage(store.path(keys[0]), 0)  # magic
    with open(store.path(keys[1]), "r+b") as f:
        f.truncate(FILE - 1)
    shard = store.path(keys[2]).parent
    stale, fresh = shard / ".x.1.2.stale.tmp", shard / ".x.1.2.fresh.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    magic = metric("epserve_prefix_cache_corrupt_pages_total", reason="magic")
    short = metric("epserve_prefix_cache_corrupt_pages_total", reason="short")
    restarted = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    assert len(restarted) == 0
    restarted.scan()
    assert len(restarted) == 1 and restarted.contains(keys[2])
    assert metric("epserve_prefix_cache_corrupt_pages_total", reason="magic") == magic + 1
    assert metric("epserve_prefix_cache_corrupt_pages_total", reason="short") == short + 1
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a live writer
    assert len(list((tmp_path / "quarantine").iterdir())) == 2
    restarted.scan(stale_tmp_s=0)
    assert not fresh.exists()


def test_scan_leaves_other_namespaces_alone(tmp_path):
    other_ns = hashlib.sha256(b"other-model").digest()
    other = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=other_ns)
    other_key = page_keys(other_ns, list(range(64)))[0]
    other.write(other_key, NO_PARENT, 64, b"x" * PAYLOAD)
    ours = DiskPageStore(tmp_path, budget_bytes=0, namespace=NS)
    assert ours.scan() == 0 and len(ours.index) == 0 and other.path(other_key).exists()


def test_eviction_skips_a_file_it_cannot_remove(tmp_path, monkeypatch):
    store = DiskPageStore(tmp_path, budget_bytes=20 * FILE, namespace=NS)
    old, new = chain_keys(1, 3), chain_keys(2, 3)
    write_chain(store, old)
    write_chain(store, new)
    stuck = store.path(old[2])
    real_remove = os.remove

    def remove(path, *args, **kwargs):
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", remove)
    errors = metric("epserve_prefix_cache_remove_errors_total")
    evictions = metric("epserve_prefix_cache_evictions_total")
    store.budget_bytes = 3 * FILE
    with capture_logs() as logs:
        removed = store.evict()
    # The stuck leaf and its ancestors stay; the other chain's tail goes instead, within budget.
    assert removed == 3
    assert [store.contains(key) for key in old] == [True, True, True]
    assert [store.contains(key) for key in new] == [False, False, False]
    assert store.total_bytes <= 3 * FILE
    assert metric("epserve_prefix_cache_remove_errors_total") == errors + 1
    assert metric("epserve_prefix_cache_evictions_total") == evictions + 3
    assert any(e["event"] == "page_remove_failed" for e in logs)
    # Over budget with only the stuck chain left: eviction still ends.
    store.budget_bytes = 0
    assert store.evict() == 0
    assert stuck.exists() and len(store) == 3


def test_twice_the_budget_stays_within_it_and_prefix_closed(tmp_path):
    budget = 40 * FILE
    store = DiskPageStore(tmp_path, budget_bytes=budget, namespace=NS)
    written = 0
    for seed in range(20):  # 20 chains of 4 pages: twice the budget
        written += write_chain(store, chain_keys(seed, 4))
        on_disk = sum(p.stat().st_size for p in page_files(tmp_path))
        assert on_disk <= 1.05 * budget
    assert written >= 80 - 1
    headers = {bytes.fromhex(p.name[:-5]): read_header(p.read_bytes()) for p in page_files(tmp_path)}
    assert sum(h.file_size for h in headers.values()) == store.total_bytes
    for header in headers.values():
        assert header.parent == NO_PARENT or header.parent in headers
    # The most recent chains survived whole.
    assert all(store.contains(key) for key in chain_keys(19, 4))


def test_shared_directory(tmp_path):
    a = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    b = DiskPageStore(tmp_path, budget_bytes=10 * FILE, namespace=NS)
    keys = chain_keys(1, 3)
    write_chain(a, keys[:2])
    assert len(b) == 0
    assert b.read(keys[0]) == payload(keys[0])  # a file b's index does not know
    assert b.contains(keys[1])
    # b continues the chain a started: it adopts a's pages as parents.
    assert b.write(keys[2], keys[1], 64, payload(keys[2]))
    assert len(b) == 3
    # a evicts everything; b finds the files gone on read, and its rescan agrees.
    a.budget_bytes = 0
    a.scan()
    assert page_files(tmp_path) == []
    assert b.read(keys[0]) is None
    assert b.rescan_if_due(now=1e12, every_s=60.0)
    assert len(b) == 0
    assert not b.rescan_if_due(now=0.0, every_s=60.0)


def test_a_chain_another_instance_wrote_is_adopted_as_a_parent(tmp_path):
    """Instance b stores page 4 of a prompt whose pages 0-3 instance a wrote meanwhile (b's
    index knows none of them): the whole chain is adopted and page 4 written."""
    a = DiskPageStore(tmp_path, budget_bytes=100 * FILE, namespace=NS)
    b = DiskPageStore(tmp_path, budget_bytes=100 * FILE, namespace=NS)
    keys = chain_keys(9, 5)
    assert write_chain(a, keys[:4]) == 4
    assert b.write(keys[4], keys[3], 64, payload(keys[4]))
    assert len(b) == 5 and all(b.read(k) == payload(k) for k in keys)


def test_every_page_file_decodes(tmp_path):
    store = DiskPageStore(tmp_path, budget_bytes=100 * FILE, namespace=NS)
    keys = chain_keys(3, 5)
    write_chain(store, keys)
    for path in page_files(tmp_path):
        key = bytes.fromhex(path.name[:-5])
        header, data = decode_page(path.read_bytes(), key, NS)
        assert data == payload(key) and header.token_count == 64


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        DiskPageStore(tmp_path, budget_bytes=-1, namespace=NS)
    with pytest.raises(ValueError):
        DiskPageStore(tmp_path, budget_bytes=0, namespace=b"short")
