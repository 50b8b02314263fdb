"""Prometheus metrics of a prefill instance."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("epserve_prefill_requests_total", "prefill requests by outcome", ["outcome"])
PREFILL_SECONDS = Histogram("epserve_prefill_batch_seconds",
                            "per request: compute time of the prompt batch it ran in",
                            buckets=(5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
TRANSFER_SECONDS = Histogram("epserve_prefill_kv_transfer_seconds", "KV transfer time",
                             buckets=(1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0))
KV_BYTES = Counter("epserve_prefill_kv_bytes_total", "latent-KV bytes sent")
BATCH_TOKENS = Histogram("epserve_prefill_batch_tokens", "prompt tokens per batch",
                         buckets=(16, 64, 256, 1024, 4096, 16384))
QUEUE_DEPTH = Gauge("epserve_prefill_queued_requests", "prompts waiting or running")
QUEUED_TOKENS = Gauge("epserve_prefill_queued_tokens", "prompt tokens waiting or running")
PROMPT_TOKENS = Counter("epserve_prefill_prompt_tokens_total",
                        "prompt tokens by where their KV came from (hit: the prefix cache)",
                        ["cache"])
CACHE_WRITES_DROPPED = Counter("epserve_prefill_cache_writes_dropped_total",
                               "prompts whose new pages were not written (write queue full)")
