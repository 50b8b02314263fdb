"""The router's key ring: API-key records read from JetStream KV, checked per request.

Records are re-read every `refresh_s` (a revoked key stops working within that). A well-formed
key of an id not yet read is looked up by itself in KV at once (one get, with a deadline), so a
key created a moment ago works on its first request whatever the refresh's phase; at most
`MAX_MISS_LOOKUPS` such lookups run at a time, so a flood of made-up keys cannot flood NATS. A key that is malformed, unknown, of another
secret or revoked is Unauthenticated; the message never says which.
"""

from __future__ import annotations

import asyncio

import structlog

from services.auth.api_keys import ApiKeyRecord, key_id_of
from services.common import subjects
from services.common.control import kv_bucket, kv_entries

log = structlog.get_logger("auth")
REFUSED = "invalid API key (send `Authorization: Bearer <key>`; `epserve keys create` makes one)"


MAX_MISS_LOOKUPS = 4


class Unauthenticated(Exception):
    pass


async def open_keys_bucket(js):
    return await kv_bucket(js, subjects.API_KEYS_BUCKET)


async def read_records(kv, timeout_s: float = 5.0) -> dict[str, ApiKeyRecord]:
    out = {}
    for key, (value, _) in (await kv_entries(kv, timeout_s)).items():
        try:
            out[key] = ApiKeyRecord.from_json(value)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("api_key_record_unreadable", key_id=key, error=str(exc))
    return out


class KeyRing:
    def __init__(self, kv, refresh_s: float = 2.0, lookup_timeout_s: float = 2.0) -> None:
        self.kv, self.refresh_s, self.lookup_timeout_s = kv, refresh_s, lookup_timeout_s
        self.records: dict[str, ApiKeyRecord] = {}
        self._task: asyncio.Task | None = None
        self._lookups = asyncio.Semaphore(MAX_MISS_LOOKUPS)

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh(self) -> None:
        self.records = await read_records(self.kv)

    async def _look_up(self, key_id: str) -> ApiKeyRecord | None:
        """The one record `key_id` names, read from KV now; None if absent or unreadable."""
        async def get():
            async with self._lookups:
                return await self.kv.get(key_id)

        try:  # the deadline covers the wait for a lookup slot too
            entry = await asyncio.wait_for(get(), self.lookup_timeout_s)
        except Exception as exc:  # absent (KeyNotFoundError), or NATS slow or away
            if type(exc).__name__ != "KeyNotFoundError":
                log.warning("api_key_lookup_failed", key_id=key_id,
                            error=f"{type(exc).__name__}: {exc}")
            return None
        if not entry.value:
            return None
        try:
            record = ApiKeyRecord.from_json(entry.value)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("api_key_record_unreadable", key_id=key_id, error=str(exc))
            return None
        self.records[key_id] = record
        return record

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._refresh()
            except Exception as exc:  # NATS away: the last records stay in force
                log.warning("api_keys_refresh_failed", error=f"{type(exc).__name__}: {exc}")

    async def authenticate(self, key: str | None) -> ApiKeyRecord:
        key_id = key_id_of(key or "")
        if key_id is None:
            raise Unauthenticated(REFUSED)
        record = self.records.get(key_id)
        if record is None:
            record = await self._look_up(key_id)
        if record is None or record.revoked or not record.matches(key):
            log.info("api_key_refused", key_id=key_id,
                     why="unknown" if record is None else "revoked" if record.revoked
                     else "secret")
            raise Unauthenticated(REFUSED)
        return record
