"""Admission: a hard bound on requests in flight, and the switch that stops admitting (pure).

Beyond the bound a request is rejected at once, never queued: a router that queues hides
overload from the client and from whatever balances across routers. While draining, nothing
new is admitted and the requests already in flight finish.
"""

from __future__ import annotations


class AdmissionRejected(RuntimeError):
    """Base of the reasons a request is not admitted; the message is for the client."""


class AtCapacity(AdmissionRejected):
    """RESOURCE_EXHAUSTED: the router holds `max_inflight` requests already."""


class Draining(AdmissionRejected):
    """UNAVAILABLE: the router is shutting down; the client should try another router."""


class DuplicateRequest(AdmissionRejected):
    """ALREADY_EXISTS: a request with this id is in flight (ids key usage records and logs)."""


class Admission:
    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self._in_flight: set[str] = set()
        self._draining = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def draining(self) -> bool:
        return self._draining

    def admit(self, request_id: str) -> None:
        """Count the request in, or raise the reason it is refused."""
        if self._draining:
            raise Draining("router is draining (shutting down); retry on another router")
        if request_id in self._in_flight:
            raise DuplicateRequest(f"request {request_id} is already in flight")
        if len(self._in_flight) >= self.max_inflight:
            raise AtCapacity(f"router at capacity ({len(self._in_flight)} in flight)")
        self._in_flight.add(request_id)

    def release(self, request_id: str) -> None:
        """The request left (finished, failed or cancelled); unknown ids are ignored."""
        self._in_flight.discard(request_id)

    def start_draining(self) -> None:
        self._draining = True
