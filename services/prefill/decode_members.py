"""The decode instances this prefill instance may push KV to: the ones it hears heartbeats from.

`PrefillRequest.decode_endpoint` names where the prompt's KV and first token go; without this
check anyone who can call `Prefill` could make prefill dial any host:port. An endpoint is a
member once a decode heartbeat (NATS `epserve.heartbeat.decode.*`, which only decode
certificates may publish when NATS has per-role users) has named it, and stays one until no
heartbeat has named it for `forget_after_s`. That silence is measured up to the newest decode
heartbeat heard, as the router's view does (services/router/instances.py): a NATS outage
freezes membership instead of emptying it, so serving goes on.

A request may name a decode instance this process has not heard yet (it just started; the
router heard it first): `wait_member` waits a little for its heartbeat before refusing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from services.common import subjects
from services.common.states import InstanceState, Role
from services.protos_gen.epserve.v1 import control_pb2

log = structlog.get_logger("decode_members")

FORGET_AFTER_S = 300.0


class DecodeMembers:
    def __init__(self, forget_after_s: float = FORGET_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.forget_after_s, self.clock = forget_after_s, clock
        self._heard: dict[str, float] = {}  # endpoint -> when a heartbeat last named it
        self._newest: float | None = None
        self._changed = asyncio.Event()
        self._sub = None

    # ---- pure part ---------------------------------------------------------------------
    def heard(self, hb: control_pb2.Heartbeat, now: float) -> None:
        if Role.from_proto(hb.role) != Role.DECODE or not hb.endpoint:
            return
        self._newest = now
        if InstanceState.from_proto(hb.state) == InstanceState.DEAD:
            self._heard.pop(hb.endpoint, None)
            return
        if hb.endpoint not in self._heard:
            log.info("decode_member_heard", endpoint=hb.endpoint, instance=hb.instance_id)
        self._heard[hb.endpoint] = now
        self._changed.set()

    def is_member(self, endpoint: str, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        heard = self._heard.get(endpoint)
        if heard is None:
            return False
        reference = now if self._newest is None else min(now, self._newest)
        if reference - heard > self.forget_after_s:
            del self._heard[endpoint]
            return False
        return True

    def endpoints(self) -> list[str]:
        return sorted(e for e in list(self._heard) if self.is_member(e))

    # ---- NATS --------------------------------------------------------------------------
    async def wait_member(self, endpoint: str, timeout_s: float) -> bool:
        """Is `endpoint` a member, waiting up to `timeout_s` for a heartbeat naming it?"""
        deadline = self.clock() + timeout_s
        while not self.is_member(endpoint):
            left = deadline - self.clock()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return self.is_member(endpoint)
        return True

    async def subscribe(self, nc) -> DecodeMembers:
        async def on_message(msg) -> None:
            try:
                hb = control_pb2.Heartbeat.FromString(msg.data)
            except Exception as exc:  # not a heartbeat: ignore, never crash the callback
                log.warning("bad_heartbeat", subject=msg.subject, error=str(exc))
                return
            self.heard(hb, self.clock())

        self._sub = await nc.subscribe(subjects.heartbeat(Role.DECODE, ">"), cb=on_message)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # NATS already closed: nothing to undo
                pass
            self._sub = None
