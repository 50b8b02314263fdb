"""KV-cache admission for a decode instance (pure: no torch, no I/O).

A request reserves, at admission, the blocks its whole life can need
(services/balance/kv_reservation.py, the formula the router's balancer uses too). Because no running request can outgrow its reservation, a
running request is never preempted and the block allocator never runs dry mid-step.
"""

from __future__ import annotations

from services.balance.kv_reservation import kv_blocks_needed


class NeverFits(ValueError):
    """The request needs more blocks than the whole cache holds."""


class KVBudget:
    def __init__(self, total_blocks: int, block_size: int) -> None:
        if total_blocks <= 0 or block_size <= 0:
            raise ValueError("total_blocks and block_size must be > 0")
        self.total_blocks, self.block_size = total_blocks, block_size
        self._reserved: dict[str, int] = {}

    @property
    def reserved_blocks(self) -> int:
        return sum(self._reserved.values())

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.reserved_blocks

    def blocks_needed(self, prompt_tokens: int, max_tokens: int, context: int) -> int:
        return kv_blocks_needed(prompt_tokens, max_tokens, self.block_size, context)

    def try_reserve(self, request_id: str, blocks: int) -> bool:
        """Reserve or return False (caller waits); raises NeverFits if it can never fit."""
        if request_id in self._reserved:
            raise ValueError(f"{request_id} already holds a reservation")
        if blocks > self.total_blocks:
            raise NeverFits(f"needs {blocks} KV blocks; this instance has {self.total_blocks}")
        if blocks > self.free_blocks:
            return False
        self._reserved[request_id] = blocks
        return True

    def release(self, request_id: str) -> None:
        self._reserved.pop(request_id, None)

    def holds(self, request_id: str) -> bool:
        return request_id in self._reserved
