"""API keys (format, hashing, revocation) and per-key limits (pure)."""

from __future__ import annotations

import pytest

from services.auth.api_keys import ApiKeyRecord, KeyLimits, bearer, key_id_of, new_key
from services.auth.limiter import KeyLimiter, retry_after_header


def test_a_key_is_shown_once_and_stored_hashed():
    key, record = new_key("acme", now=100.0, name="ci")
    assert key.startswith(f"ep-{record.key_id}-") and key_id_of(key) == record.key_id
    assert key not in record.to_json().decode() and record.matches(key)
    assert not record.matches(key[:-1] + ("A" if key[-1] != "A" else "B"))
    again = ApiKeyRecord.from_json(record.to_json())
    assert again == record and again.matches(key)
    revoked = again.revoke(200.0)
    assert revoked.revoked and revoked.revoke(300.0).revoked_at == 200.0


@pytest.mark.parametrize("bad", ["", "ep-", "sk-abc", "ep-xyz-123", "ep-0123456789ab-short",
                                 "ep-0123456789AB-" + "a" * 40])
def test_malformed_keys_have_no_id(bad):
    assert key_id_of(bad) is None


def test_tenants_are_plain_names():
    for bad in ("", "-x", "a b", "x" * 65, "é"):
        with pytest.raises(ValueError, match="tenant"):
            new_key(bad, now=0.0)


def test_bearer_header():
    assert bearer("Bearer ep-1") == "ep-1" and bearer("bearer  ep-2 ") == "ep-2"
    assert bearer(None) is None and bearer("Basic abc") is None and bearer("Bearer ") is None


def test_requests_per_second_bucket_and_retry_after():
    lim, limits = KeyLimiter(), KeyLimits(requests_per_s=2.0)
    assert lim.acquire("k", limits, 0.0).ok and lim.acquire("k", limits, 0.0).ok
    refused = lim.acquire("k", limits, 0.0)
    assert not refused.ok and refused.retry_after_s == pytest.approx(0.5)
    assert "requests per second" in refused.reason and retry_after_header(0.5) == "1"
    assert lim.acquire("k", limits, 0.5).ok  # one more token by then
    assert lim.acquire("other", limits, 0.0).ok  # keys do not share buckets


def test_tokens_per_minute_charge_at_the_end_and_debt_waits():
    lim, limits = KeyLimiter(), KeyLimits(tokens_per_min=600)  # 10 tokens/s
    assert lim.acquire("k", limits, 0.0).ok
    lim.release("k", limits, tokens=700, now=0.0)  # a long answer: 100 tokens in debt
    refused = lim.acquire("k", limits, 0.0)
    assert not refused.ok and refused.retry_after_s == pytest.approx(10.1)
    assert lim.acquire("k", limits, 10.2).ok


def test_concurrency_cap_is_held_until_release():
    lim, limits = KeyLimiter(), KeyLimits(max_concurrent=1)
    assert lim.acquire("k", limits, 0.0).ok
    assert not lim.acquire("k", limits, 1.0).ok
    lim.release("k", limits, tokens=5, now=2.0)
    assert lim.acquire("k", limits, 2.0).ok


def test_unlimited_by_default_and_negative_limits_refused():
    lim = KeyLimiter()
    assert all(lim.acquire("k", KeyLimits(), 0.0).ok for _ in range(1000))
    with pytest.raises(ValueError):
        KeyLimits(requests_per_s=-1)


def test_reserved_token_cap_holds_until_unreserved_and_says_when_never():
    lim, limits = KeyLimiter(), KeyLimits(max_reserved_tokens=100)
    assert lim.reserve("k", limits, 60, 0.0).ok
    over = lim.reserve("k", limits, 50, 0.0)
    assert not over.ok and over.retry_after_s > 0 and "60 tokens reserved" in over.reason
    assert lim.reserve("other", limits, 50, 0.0).ok  # per key
    lim.unreserve("k", limits, 60, 1.0)
    assert lim.reserve("k", limits, 100, 1.0).ok
    never = lim.reserve("k2", limits, 101, 1.0)
    assert not never.ok and never.retry_after_s == 0 and "over the key's" in never.reason
    assert all(lim.reserve("k", KeyLimits(), 10**9, 0.0).ok for _ in range(3))  # 0: no cap
    with pytest.raises(ValueError):
        KeyLimits(max_reserved_tokens=-1)


def test_records_without_the_newer_limits_still_load():
    _, record = new_key("acme", 1.0, limits=KeyLimits(max_concurrent=2))
    old = record.to_json().replace(b',"max_reserved_tokens":0', b"")
    assert ApiKeyRecord.from_json(old).limits == KeyLimits(max_concurrent=2)
