"""Prometheus metrics of a decode instance."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("epserve_decode_requests_total", "decode requests by outcome", ["outcome"])
RUNNING = Gauge("epserve_decode_running_requests", "requests holding a KV reservation")
KV_BLOCKS = Gauge("epserve_decode_kv_blocks_reserved", "KV blocks reserved")
BATCH = Histogram("epserve_decode_batch_size", "sequences per decode step",
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128))
TOKENS = Counter("epserve_decode_tokens_total", "tokens generated")
TPOT = Histogram("epserve_decode_tpot_seconds", "time per output token per request",
                 buckets=(1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0))
KV_TRANSFERS = Counter("epserve_decode_kv_transfers_total", "KV transfers by outcome", ["outcome"])
KV_BYTES = Counter("epserve_decode_kv_bytes_total", "latent-KV bytes received")
WAITING = Gauge("epserve_decode_waiting_requests", "requests waiting for KV room (queue depth)")
DRAFT_TOKENS = Counter("epserve_decode_spec_draft_tokens_total",
                       "speculative draft tokens verified, by draft position", ["position"])
ACCEPTED_TOKENS = Counter("epserve_decode_spec_accepted_tokens_total",
                          "speculative draft tokens accepted, by draft position", ["position"])
DRAFT_KV = Counter("epserve_decode_spec_draft_kv_total",
                   "KV transfers whose MTP-layer KV of the prompt and first draft were used "
                   "(from a prefill with --speculative mtp)")
