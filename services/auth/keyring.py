"""The router's key ring: API-key records read from JetStream KV, checked per request.

Records are re-read every `refresh_s` (a revoked key stops working within that), and at once
(at most every `miss_refresh_s`) when a well-formed key of an unknown id is presented, so a key
created a moment ago works on its first request. A key that is malformed, unknown, of another
secret or revoked is Unauthenticated; the message never says which.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from services.auth.api_keys import ApiKeyRecord, key_id_of
from services.common import subjects
from services.common.control import kv_bucket, kv_entries

log = structlog.get_logger("auth")
REFUSED = "invalid API key (send `Authorization: Bearer <key>`; `epserve keys create` makes one)"


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
    def __init__(self, kv, refresh_s: float = 2.0, miss_refresh_s: float = 1.0) -> None:
        self.kv, self.refresh_s, self.miss_refresh_s = kv, refresh_s, miss_refresh_s
        self.records: dict[str, ApiKeyRecord] = {}
        self._read_at = 0.0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh(self) -> None:
        self._read_at = time.monotonic()
        self.records = await read_records(self.kv)

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
        if record is None and time.monotonic() - self._read_at >= self.miss_refresh_s:
            try:
                await self._refresh()
            except Exception as exc:
                log.warning("api_keys_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            record = self.records.get(key_id)
        if record is None or record.revoked or not record.matches(key):
            log.info("api_key_refused", key_id=key_id,
                     why="unknown" if record is None else "revoked" if record.revoked
                     else "secret")
            raise Unauthenticated(REFUSED)
        return record
