"""Prometheus metrics of the router."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

REQUESTS = Counter("epserve_router_requests_total", "generate requests by outcome", ["outcome"])
IN_FLIGHT = Gauge("epserve_router_in_flight", "requests admitted and not finished")
PROMPTS_ENCODING = Gauge("epserve_router_prompts_encoding",
                         "prompts being tokenised or waiting for a tokenising thread")
PROMPT_TOKENS = Counter("epserve_router_prompt_tokens_total", "prompt tokens of admitted requests")
COMPLETION_TOKENS = Counter("epserve_router_completion_tokens_total", "tokens streamed to clients")
TTFT = Histogram("epserve_router_ttft_seconds", "time to first token", buckets=LATENCY_BUCKETS)
TPOT = Histogram("epserve_router_tpot_seconds", "time per output token after the first",
                 buckets=(1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0))
E2E = Histogram("epserve_router_request_seconds", "request time end to end",
                buckets=LATENCY_BUCKETS)
PREFILL_RETRIES = Counter("epserve_router_prefill_retries_total", "prefills re-driven")
DECODE_REFUSALS = Counter("epserve_router_decode_refusals_total",
                          "decode instances that refused a request (full, draining)")
MIGRATIONS = Counter("epserve_router_migrations_total",
                     "requests moved to another decode instance mid-stream, by reason", ["reason"])
ELIGIBLE = Gauge("epserve_router_eligible_instances", "instances taking new requests", ["role"])
USAGE_PUBLISH_ERRORS = Counter("epserve_router_usage_publish_errors_total",
                               "usage records that could not be written to JetStream")
