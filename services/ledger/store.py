"""The ledger's JetStream KV bucket: one JSON entry per token bucket and per device holder,
the cursor (every usage-stream sequence up to it is folded in) and the ledger's settings.

Writes are compare-and-set on the revision last read or written, so a second writer (another
ledger) shows up as a failed write instead of a lost update; the ledger then reads everything
back and folds again (services/ledger/folder.py), which the per-bucket sequence makes safe.
`read_ledger` is the read-only view `economics live` uses.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from services.common import subjects
from services.common.control import kv_bucket, kv_entries
from services.economics.tally import BUCKET_PREFIX, UPTIME_PREFIX, DeviceUptime, TokenBucket

CURSOR_KEY, META_KEY = "cursor", "meta"


@dataclass
class LedgerEntries:
    buckets: list[TokenBucket] = field(default_factory=list)
    uptimes: list[DeviceUptime] = field(default_factory=list)
    cursor: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class LedgerStore:
    def __init__(self, kv, timeout_s: float = 5.0) -> None:
        self.kv, self.timeout_s = kv, timeout_s
        self.revisions: dict[str, int] = {}

    @classmethod
    async def open(cls, js, timeout_s: float = 5.0) -> LedgerStore:
        return cls(await kv_bucket(js, subjects.LEDGER_BUCKET), timeout_s)

    async def read_all(self) -> dict[str, Any]:
        """Every entry's document by key (and their revisions, for the next writes)."""
        docs = {}
        for key, (value, revision) in (await kv_entries(self.kv, self.timeout_s)).items():
            docs[key] = json.loads(value)
            self.revisions[key] = revision
        return docs

    async def write(self, key: str, doc: Any) -> None:
        """Compare-and-set against the revision this store last saw (create when none)."""
        data = json.dumps(doc, separators=(",", ":")).encode()
        last = self.revisions.get(key)
        if last is None:
            revision = await asyncio.wait_for(self.kv.create(key, data), self.timeout_s)
        else:
            revision = await asyncio.wait_for(self.kv.update(key, data, last=last), self.timeout_s)
        self.revisions[key] = revision

    def forget_revisions(self) -> None:
        self.revisions.clear()


def entries_from(docs: dict[str, Any]) -> LedgerEntries:
    out = LedgerEntries(cursor=int(docs.get(CURSOR_KEY, {}).get("seq", 0)),
                        meta=docs.get(META_KEY, {}))
    for key, doc in sorted(docs.items()):
        if key.startswith(BUCKET_PREFIX):
            out.buckets.append(TokenBucket.from_doc(doc))
        elif key.startswith(UPTIME_PREFIX):
            out.uptimes.append(DeviceUptime.from_doc(doc))
    return out


async def read_ledger(js, timeout_s: float = 5.0) -> LedgerEntries:
    return entries_from(await LedgerStore(await js.key_value(subjects.LEDGER_BUCKET),
                                          timeout_s).read_all())
