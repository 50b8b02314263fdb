"""Crash-test helper: writes prefix-cache pages in a loop until killed.

    python -m tests.prefix_cache_writer ROOT NAMESPACE_HEX SEED

Writes chains of 4 MiB pages with a budget of 8 pages, so that evictions run too. The size
matters: a write of that many bytes takes long enough for a SIGKILL to land inside it often,
so a store that wrote straight to the final name would be caught (with 256 KiB pages it was
not, in a trial). Touches ROOT/ready.<pid> once the
store is open, for the test to wait on. Imports no torch: it starts in about a second.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from services.prefix_cache.disk_store import DiskPageStore
from services.prefix_cache.keys import NO_PARENT, page_keys

PAYLOAD_BYTES = 4 << 20
PAGES_PER_CHAIN = 4
MAX_CHAINS = 100_000  # far more than a test lets it write before the kill


def main(root: Path, namespace: bytes, seed: int) -> None:
    import os

    rng = random.Random(seed)
    store = DiskPageStore(root, budget_bytes=8 * PAYLOAD_BYTES, namespace=namespace,
                         scan_on_start=True)
    (root / f"ready.{os.getpid()}").touch()
    for _ in range(MAX_CHAINS):
        ids = [rng.randrange(2**32) for _ in range(64 * PAGES_PER_CHAIN)]
        keys = page_keys(namespace, ids)
        for i, key in enumerate(keys):
            store.write(key, keys[i - 1] if i else NO_PARENT, 64, rng.randbytes(PAYLOAD_BYTES))


if __name__ == "__main__":
    main(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3]))
