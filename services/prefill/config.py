"""Prefill-instance settings (flags / EPSERVE_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.attention.config import AttentionConfig


@dataclass(frozen=True)
class PrefillConfig(AttentionConfig):
    max_batch_tokens: int = field(default=4096, metadata={"help": "most prompt tokens per batch"})
    max_queue: int = field(default=256, metadata={"help": "most prompts waiting"})
    chunk_tokens: int = field(default=2048, metadata={
        "help": "a prompt longer than this is prefilled alone, in chunks of this many tokens "
                "(attention memory bounded by chunk x prompt length)"})
    block_size: int = field(default=64, metadata={"help": "tokens per KV block"})
    transfer_timeout_s: float = field(default=30.0, metadata={"help": "KV transfer deadline"})
    kv_chunk_bytes: int = field(default=1 << 20, metadata={"help": "bytes per KV chunk"})
    # The prefix KV cache (services/prefix_cache): off unless a directory is given.
    kv_cache_dir: str = field(default="", metadata={
        "help": "prefix KV cache directory, shared by every prefill instance (off when empty)"})
    kv_cache_bytes: int = field(default=8 << 30, metadata={
        "help": "disk budget of the prefix cache (least recently used pages go first)"})
    kv_cache_memory_bytes: int = field(default=512 << 20, metadata={
        "help": "this instance's memory tier in front of the disk"})
    kv_cache_namespace: str = field(default="", metadata={
        "help": "page-key namespace instead of the weights' fingerprint (a name for the model "
                "version; instances must agree)"})
    kv_cache_read_delay_s: float = field(default=0.0, metadata={
        "help": "fault injection: every page read from disk takes this much longer (a slow "
                "store; the cache then reads only what beats recomputing)"})
    kv_cache_rescan_s: float = field(default=30.0, metadata={
        "help": "re-read the directory this often (pages other instances wrote or evicted)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_tokens <= 0 or self.max_queue <= 0 or self.chunk_tokens <= 0:
            raise ValueError("--max-batch-tokens, --max-queue and --chunk-tokens must be > 0")
        if self.kv_cache_bytes <= 0 or self.kv_cache_memory_bytes < 0:
            raise ValueError("--kv-cache-bytes must be > 0 and --kv-cache-memory-bytes >= 0")
        if self.kv_cache_read_delay_s < 0:
            raise ValueError("--kv-cache-read-delay-s must be >= 0")
        if not self.kv_cache_rescan_s > 0:
            raise ValueError("--kv-cache-rescan-s must be > 0")
