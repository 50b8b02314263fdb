"""Who may call the router, and how much: off (`--api-keys` not given: every call is tenant
""), or API keys (services/auth) with their per-key limits. The tenant a key names goes into
the usage record (billing) and the prefix-cache namespace (tenants never share pages)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.auth.api_keys import KeyLimits
from services.auth.keyring import KeyRing, Unauthenticated
from services.auth.limiter import KeyLimiter
from services.router import metrics
from services.router.attempt import RequestFailed


@dataclass(frozen=True)
class Grant:
    key_id: str = ""
    tenant: str = ""
    limits: KeyLimits = KeyLimits()


class Throttled(RequestFailed):
    """Over a key's limit: RESOURCE_EXHAUSTED / HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.retry_after_s = retry_after_s


OPEN = Grant()


class Access:
    def __init__(self, keyring: KeyRing | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keyring, self.clock = keyring, clock
        self.limiter = KeyLimiter()

    @property
    def enabled(self) -> bool:
        return self.keyring is not None

    async def check(self, key: str | None, rid: str) -> Grant:
        """Authentication only (Tokenize, model lists)."""
        if self.keyring is None:
            return OPEN
        try:
            record = await self.keyring.authenticate(key)
        except Unauthenticated as exc:
            metrics.REQUESTS.labels(outcome="unauthenticated").inc()
            raise RequestFailed(grpc.StatusCode.UNAUTHENTICATED, f"{rid}: {exc}") from exc
        return Grant(record.key_id, record.tenant, record.limits)

    async def admit(self, key: str | None, rid: str) -> Grant:
        """Authentication and the key's limits; every admitted grant is `done` once."""
        grant = await self.check(key, rid)
        if grant is OPEN:
            return grant
        decision = self.limiter.acquire(grant.key_id, grant.limits, self.clock())
        if not decision.ok:
            metrics.REQUESTS.labels(outcome="rate_limited").inc()
            raise Throttled(f"{rid}: API key {grant.key_id} is {decision.reason}; retry in "
                            f"{decision.retry_after_s:.1f}s", decision.retry_after_s)
        return grant

    def reserve(self, grant: Grant, tokens: int, rid: str) -> None:
        """The key's cap on KV tokens reserved in flight (prompt + max_tokens); one request
        over the cap alone is RESOURCE_EXHAUSTED for good (no Retry-After)."""
        if grant is OPEN:
            return
        decision = self.limiter.reserve(grant.key_id, grant.limits, tokens, self.clock())
        if decision.ok:
            return
        metrics.REQUESTS.labels(outcome="rate_limited").inc()
        message = f"{rid}: API key {grant.key_id}: {decision.reason}"
        if not decision.retry_after_s:
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        raise Throttled(f"{message}; retry in {decision.retry_after_s:.1f}s",
                        decision.retry_after_s)

    def unreserve(self, grant: Grant, tokens: int) -> None:
        if grant is not OPEN:
            self.limiter.unreserve(grant.key_id, grant.limits, tokens, self.clock())

    def done(self, grant: Grant, tokens: int) -> None:
        if grant is not OPEN:
            self.limiter.release(grant.key_id, grant.limits, tokens, self.clock())
