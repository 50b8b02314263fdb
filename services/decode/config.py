"""Decode-instance settings (flags / EPSERVE_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.attention.config import AttentionConfig


@dataclass(frozen=True)
class DecodeConfig(AttentionConfig):
    kv_blocks: int = field(default=256, metadata={"help": "paged latent-KV cache size in blocks"})
    block_size: int = field(default=64, metadata={"help": "tokens per KV block"})
    max_batch: int = field(default=64, metadata={"help": "most sequences per decode step"})
    admission_wait_s: float = field(default=30.0, metadata={
        "help": "how long a request waits for KV room before RESOURCE_EXHAUSTED"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_blocks <= 0 or self.block_size <= 0 or self.max_batch <= 0:
            raise ValueError("--kv-blocks, --block-size and --max-batch must be > 0")

