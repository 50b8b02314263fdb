"""API keys and their records (pure).

A key is `ep-<key id>-<secret>`: the id (12 hex) names its record, the secret (32 random
bytes, URL-safe) is never stored: the record keeps sha256 of the whole key, compared in constant
time. A key is shown once, when created. Records live in the JetStream KV bucket
`epserve_api_keys` under their id; revoking sets `revoked_at` (the record stays, so a revoked
key is told apart from an unknown one in logs, never in responses).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass, replace

KEY_FORMAT = re.compile(r"^ep-([0-9a-f]{12})-([A-Za-z0-9_-]{20,})$")
TENANT_FORMAT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class KeyLimits:
    """0 means unlimited."""

    requests_per_s: float = 0.0
    tokens_per_min: int = 0  # prompt + completion tokens
    max_concurrent: int = 0
    # prompt + max_tokens summed over the key's requests in flight: the KV a decode instance
    # reserves for them, which a few long requests could otherwise take whole
    max_reserved_tokens: int = 0

    def __post_init__(self) -> None:
        if min(self.requests_per_s, self.tokens_per_min, self.max_concurrent,
               self.max_reserved_tokens) < 0:
            raise ValueError("key limits must be >= 0 (0 = unlimited)")


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant: str
    secret_sha256: str
    name: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None
    limits: KeyLimits = KeyLimits()

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.secret_sha256, _digest(key))

    def revoke(self, now: float) -> ApiKeyRecord:
        return self if self.revoked else replace(self, revoked_at=now)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ApiKeyRecord:
        d = json.loads(data)
        return cls(**{**d, "limits": KeyLimits(**d.get("limits", {}))})


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(tenant: str, now: float, name: str = "",
            limits: KeyLimits | None = None) -> tuple[str, ApiKeyRecord]:
    """(the key, shown once; its record, stored)."""
    if not TENANT_FORMAT.match(tenant):
        raise ValueError(f"tenant must be 1-64 of [A-Za-z0-9._-], starting alphanumeric, "
                         f"got {tenant!r}")
    key_id = secrets.token_hex(6)
    key = f"ep-{key_id}-{secrets.token_urlsafe(32)}"
    return key, ApiKeyRecord(key_id, tenant, _digest(key), name, now, None, limits or KeyLimits())


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key; None for anything else."""
    m = KEY_FORMAT.match(key)
    return m[1] if m else None


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value (None when absent)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
