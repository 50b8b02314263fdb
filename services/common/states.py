"""One vocabulary for who a member is and where it stands: `Role` and `InstanceState`.

The wire values are the control-plane proto's (control.proto `Role`, `InstanceState`); the
names are what logs, metrics labels, heartbeat subjects, the router's view and the balancers
use. Convert only here.
"""

from __future__ import annotations

from enum import StrEnum

from services.protos_gen.epserve.v1 import control_pb2


class Role(StrEnum):
    ROUTER = "router"
    SCHEDULER = "scheduler"
    PREFILL = "prefill"
    DECODE = "decode"
    EXPERT_WORKER = "expert-worker"
    LEDGER = "ledger"  # live metering: folds usage records and device occupancy

    @property
    def proto(self) -> int:
        return _ROLE_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> Role | None:
        """None for a value this build does not know (ROLE_UNSPECIFIED or newer)."""
        return _ROLE_FROM_PROTO.get(value)


class InstanceState(StrEnum):
    STARTING = "starting"  # loading, waiting for peers: takes no work yet
    SERVING = "serving"
    DRAINING = "draining"  # finishing its work, takes no new requests
    DEAD = "dead"  # set by the scheduler (or a router) after missed heartbeats

    @property
    def proto(self) -> int:
        return _STATE_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> InstanceState:
        """An unset or unknown state reads as STARTING: never eligible for work."""
        return _STATE_FROM_PROTO.get(value, cls.STARTING)


_ROLE_TO_PROTO = {Role.ROUTER: control_pb2.ROLE_ROUTER, Role.SCHEDULER: control_pb2.ROLE_SCHEDULER,
                  Role.PREFILL: control_pb2.ROLE_PREFILL, Role.DECODE: control_pb2.ROLE_DECODE,
                  Role.EXPERT_WORKER: control_pb2.ROLE_EXPERT_WORKER,
                  Role.LEDGER: control_pb2.ROLE_LEDGER}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}
_STATE_TO_PROTO = {InstanceState.STARTING: control_pb2.STATE_STARTING,
                   InstanceState.SERVING: control_pb2.STATE_SERVING,
                   InstanceState.DRAINING: control_pb2.STATE_DRAINING,
                   InstanceState.DEAD: control_pb2.STATE_DEAD}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}
