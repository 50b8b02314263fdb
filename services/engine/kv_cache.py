"""Paged latent-KV cache: pure block accounting plus the per-layer slot tensors.

A slot is one token's latent KV (kv_lora_rank + qk_rope_head_dim values) in one layer; slots
come in blocks of `block_size` tokens (64, DeepSeek's KV storage unit). BlockAllocator is pure
bookkeeping (no torch), unit-tested on its own; LatentKVCache adds the tensors and turns a list
of (sequence, past length, new tokens) into an AttentionBatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.model.batch import AttentionBatch


class CacheFull(Exception):
    """Not enough free blocks; the caller waits or refuses the request."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 64) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq_id: str, total_tokens: int) -> bool:
        have = len(self._tables.get(seq_id, ()))
        return self.blocks_for(total_tokens) - have <= len(self._free)

    def grow(self, seq_id: str, total_tokens: int) -> None:
        """Make room for `total_tokens` tokens of seq_id (all or nothing)."""
        table = self._tables.setdefault(seq_id, [])
        need = self.blocks_for(total_tokens) - len(table)
        if need > len(self._free):
            if not table:
                del self._tables[seq_id]
            raise CacheFull(f"need {need} blocks, {len(self._free)} free")
        for _ in range(max(need, 0)):
            table.append(self._free.pop())

    def free(self, seq_id: str) -> None:
        for block in reversed(self._tables.pop(seq_id, [])):
            self._free.append(block)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def slots(self, seq_id: str, start: int, stop: int) -> list[int]:
        """Flat slot ids of positions [start, stop) of seq_id."""
        table, bs = self._tables[seq_id], self.block_size
        if stop > len(table) * bs:
            raise ValueError(f"{seq_id}: position {stop - 1} beyond its {len(table)} blocks")
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]


@dataclass(frozen=True)
class SeqChunk:
    seq_id: str
    past: int  # tokens already in the cache
    new: int  # tokens this step adds
    # the first position the new tokens attend to (the MTP draft layer's cache starts where
    # the sequence's decoding did, see services/engine/speculative.py)
    context_from: int = 0


class LatentKVCache:
    """`layers`: the model's latent KV, one tensor per decoder layer; `draft_layers`: the
    speculative draft's (the MTP layer's), in the same slots, so one block table serves both
    and the draft's KV is freed with the sequence."""

    def __init__(self, num_layers: int, latent_dim: int, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 draft_layers: int = 0) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.layers, self.draft_layers = [[
            torch.zeros(num_blocks * block_size, latent_dim, dtype=dtype, device=device)
            for _ in range(n)] for n in (num_layers, draft_layers)]

    def batch(self, chunks: list[SeqChunk], speculative: bool = False) -> AttentionBatch:
        """Reserve room for each chunk's new tokens and describe where everything lives."""
        for c in chunks:
            self.allocator.grow(c.seq_id, c.past + c.new)
        positions, write, ctx = [], [], []
        for c in chunks:
            positions.extend(range(c.past, c.past + c.new))
            slots = self.allocator.slots(c.seq_id, c.context_from, c.past + c.new)
            write.extend(slots[c.past - c.context_from:])
            ctx.append(torch.tensor(slots, dtype=torch.long))
        return AttentionBatch(
            positions=torch.tensor(positions, dtype=torch.long),
            query_lens=tuple(c.new for c in chunks),
            context_slots=tuple(ctx),
            write_slots=torch.tensor(write, dtype=torch.long),
            speculative=speculative,
        )

    def read(self, seq_id: str, length: int) -> torch.Tensor:
        """[num_layers, length, latent_dim]: a sequence's latent KV (for KV transfer)."""
        idx = torch.tensor(self.allocator.slots(seq_id, 0, length), dtype=torch.long)
        return torch.stack([layer[idx.to(layer.device)] for layer in self.layers])

    def write(self, seq_id: str, latent: torch.Tensor) -> None:
        """Install a sequence's latent KV [num_layers, length, latent_dim] (received by transfer)."""
        length = latent.shape[1]
        self.allocator.grow(seq_id, length)
        idx = torch.tensor(self.allocator.slots(seq_id, 0, length), dtype=torch.long)
        for layer, values in zip(self.layers, latent, strict=True):
            layer[idx.to(layer.device)] = values.to(layer.dtype)

    def read_draft(self, seq_id: str, start: int, stop: int) -> torch.Tensor:
        """[draft layers, stop - start, latent_dim]: the draft layers' KV of positions
        [start, stop) (what a prefill sends with the prompt's KV)."""
        idx = torch.tensor(self.allocator.slots(seq_id, start, stop), dtype=torch.long)
        return torch.stack([layer[idx.to(layer.device)] for layer in self.draft_layers])

    def write_draft(self, seq_id: str, start: int, latent: torch.Tensor) -> None:
        """Install the draft layers' KV of positions [start, start + n) (the sequence's blocks
        must hold them: write() its prompt first)."""
        idx = torch.tensor(self.allocator.slots(seq_id, start, start + latent.shape[1]),
                           dtype=torch.long)
        for layer, values in zip(self.draft_layers, latent, strict=True):
            layer[idx.to(layer.device)] = values.to(layer.dtype)

    def free(self, seq_id: str) -> None:
        self.allocator.free(seq_id)
