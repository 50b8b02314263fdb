"""Prefill-instance settings (flags / EPSERVE_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.attention.config import AttentionConfig


@dataclass(frozen=True)
class PrefillConfig(AttentionConfig):
    max_batch_tokens: int = field(default=4096, metadata={"help": "most prompt tokens per batch"})
    max_queue: int = field(default=256, metadata={"help": "most prompts waiting"})
    block_size: int = field(default=64, metadata={"help": "tokens per KV block"})
    transfer_timeout_s: float = field(default=30.0, metadata={"help": "KV transfer deadline"})
    kv_chunk_bytes: int = field(default=1 << 20, metadata={"help": "bytes per KV chunk"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_tokens <= 0 or self.max_queue <= 0:
            raise ValueError("--max-batch-tokens and --max-queue must be > 0")
