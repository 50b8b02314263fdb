"""What an instance reports about its load, in one shape: cores return it, heartbeats carry
it (control.proto `InstanceLoad`), the router's view keeps it and the balancers read it.
Fields that do not apply to a role stay zero."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.protos_gen.epserve.v1 import control_pb2


@dataclass(frozen=True)
class InstanceLoad:
    queued_requests: int = 0  # waiting (router: in flight)
    queued_tokens: int = 0  # prefill: input tokens waiting or running
    attention_cost: float = 0.0  # prefill: sum of squared input lengths held
    running_requests: int = 0  # decode: requests holding a KV reservation
    kv_blocks_in_use: int = 0  # decode
    kv_blocks_total: int = 0  # decode
    kv_block_size: int = 0  # decode: tokens per KV block (what a reservation is counted in)

    def to_proto(self) -> control_pb2.InstanceLoad:
        return control_pb2.InstanceLoad(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, msg: control_pb2.InstanceLoad) -> InstanceLoad:
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})
