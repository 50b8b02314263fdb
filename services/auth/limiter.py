"""Per-key limits (pure): requests per second, tokens per minute, concurrent requests, and
the KV tokens reserved for the key's requests in flight.

Requests and tokens are token buckets: a bucket holds up to one second of requests (at least
one) and one minute of tokens, refilled continuously. A request is admitted when a request
token is there, the token bucket is not in debt and the key is under its concurrency cap; its
tokens (prompt + completion) are charged when it ends, so a long answer can put the bucket in
debt and the next request waits until the debt is repaid. A refusal says how long to wait
(Retry-After). The reservation (prompt + max_tokens, what decode reserves) is known only once
the prompt is tokenised, so it is taken after admission (`reserve`) and given back with the
request (`unreserve`); a request that alone exceeds the cap can never run and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.auth.api_keys import KeyLimits


@dataclass(frozen=True)
class Decision:
    ok: bool
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass
class _State:
    requests: float
    tokens: float
    at: float
    in_flight: int = 0
    reserved: int = 0  # KV tokens of the requests in flight


@dataclass
class KeyLimiter:
    _states: dict[str, _State] = field(default_factory=dict)

    def _state(self, key_id: str, limits: KeyLimits, now: float) -> _State:
        s = self._states.get(key_id)
        if s is None:
            s = self._states[key_id] = _State(self._burst(limits), limits.tokens_per_min, now)
        elapsed = max(now - s.at, 0.0)
        if limits.requests_per_s:
            s.requests = min(self._burst(limits), s.requests + elapsed * limits.requests_per_s)
        if limits.tokens_per_min:
            s.tokens = min(float(limits.tokens_per_min),
                           s.tokens + elapsed * limits.tokens_per_min / 60.0)
        s.at = now
        return s

    @staticmethod
    def _burst(limits: KeyLimits) -> float:
        return max(1.0, limits.requests_per_s)

    def acquire(self, key_id: str, limits: KeyLimits, now: float) -> Decision:
        s = self._state(key_id, limits, now)
        if limits.max_concurrent and s.in_flight >= limits.max_concurrent:
            return Decision(False, 1.0, f"{s.in_flight} requests in flight, the key's limit "
                                        f"is {limits.max_concurrent}")
        if limits.requests_per_s and s.requests < 1.0:
            wait = (1.0 - s.requests) / limits.requests_per_s
            return Decision(False, wait, f"over {limits.requests_per_s:g} requests per second")
        if limits.tokens_per_min and s.tokens <= 0:
            wait = (1.0 - s.tokens) * 60.0 / limits.tokens_per_min
            return Decision(False, wait, f"over {limits.tokens_per_min} tokens per minute")
        if limits.requests_per_s:
            s.requests -= 1.0
        s.in_flight += 1
        return Decision(True)

    def release(self, key_id: str, limits: KeyLimits, tokens: int, now: float) -> None:
        s = self._state(key_id, limits, now)
        s.in_flight = max(s.in_flight - 1, 0)
        if limits.tokens_per_min:
            s.tokens -= tokens


    def reserve(self, key_id: str, limits: KeyLimits, tokens: int, now: float) -> Decision:
        cap = limits.max_reserved_tokens
        if not cap:
            return Decision(True)
        s = self._state(key_id, limits, now)
        if tokens > cap:
            return Decision(False, 0.0, f"a request of {tokens} tokens (prompt + max_tokens) "
                                        f"is over the key's reserved-token cap of {cap}")
        if s.reserved + tokens > cap:
            return Decision(False, 1.0, f"{s.reserved} tokens reserved by requests in flight; "
                                        f"{tokens} more would pass the key's cap of {cap}")
        s.reserved += tokens
        return Decision(True)

    def unreserve(self, key_id: str, limits: KeyLimits, tokens: int, now: float) -> None:
        if limits.max_reserved_tokens:
            s = self._state(key_id, limits, now)
            s.reserved = max(s.reserved - tokens, 0)


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1 (HTTP's Retry-After)."""
    return str(max(1, math.ceil(seconds)))
