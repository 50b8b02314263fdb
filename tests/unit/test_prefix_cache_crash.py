"""Crash safety: a writer SIGKILLed at random points never leaves a bad file under a final
name, and the temporary files it leaves are cleaned by the next scan."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.prefix_cache.disk_store import DiskPageStore
from services.prefix_cache.page_file import decode_page

REPO = Path(__file__).resolve().parents[2]
NS = hashlib.sha256(b"crash-ns").digest()
KILLS = 10
START_DEADLINE_S = 60.0


def wait_ready(root: Path, proc: subprocess.Popen) -> None:
    marker = root / f"ready.{proc.pid}"
    deadline = time.monotonic() + START_DEADLINE_S
    while not marker.exists():
        assert proc.poll() is None, f"writer exited early: {proc.stderr.read()!r}"
        assert time.monotonic() < deadline, "writer did not start"
        time.sleep(0.01)


def test_sigkill_never_leaves_a_bad_page(tmp_path):
    rng = random.Random(7)
    kills_mid_write = 0
    tmp_before: set[Path] = set()
    for round_ in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.prefix_cache_writer", str(tmp_path), NS.hex(),
             str(round_)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_ready(tmp_path, proc)
            time.sleep(rng.uniform(0.02, 0.2))
            assert proc.poll() is None, "the writer stopped before the kill"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            proc.stderr.close()
        tmp_now = set(tmp_path.rglob("*.tmp"))
        kills_mid_write += bool(tmp_now - tmp_before)
        tmp_before = tmp_now
        pages = [p for p in tmp_path.rglob("*.page") if "quarantine" not in p.parts]
        for path in pages:
            decode_page(path.read_bytes(), bytes.fromhex(path.name[:-5]), NS)  # raises if bad
    assert not (tmp_path / "quarantine").exists(), "a scan found a damaged page"
    pages = [p for p in tmp_path.rglob("*.page")]
    assert pages, "the writer never wrote a page"
    store = DiskPageStore(tmp_path, budget_bytes=1 << 30, namespace=NS)
    assert store.scan(stale_tmp_s=0) == len(pages)
    assert list(tmp_path.rglob("*.tmp")) == []
    # A report, not an assertion on luck: how often a kill landed between a page's temporary
    # file and its rename.
    print(f"kills that left a new temporary file: {kills_mid_write}/{KILLS}")
