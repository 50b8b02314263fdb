"""Prometheus metrics of an expert worker."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily


class WorkerMetrics:
    def __init__(self) -> None:
        self.batches = Counter("epserve_expert_batches_total", "dispatch batches served", ["layer"])
        self.tokens = Counter("epserve_expert_tokens_total", "tokens received", ["layer"])
        self.rejected = Counter("epserve_expert_rejected_total", "rejected dispatches", ["code"])
        self.latency = Histogram("epserve_expert_dispatch_seconds", "request to reply",
                                 buckets=(1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.5))
        self.compute = Histogram("epserve_expert_compute_seconds", "grouped FFN time",
                                 buckets=(1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.5))

    def observe(self, req, seconds: float, compute_seconds: float) -> None:
        layer = str(req.layer_id)
        self.batches.labels(layer=layer).inc()
        self.tokens.labels(layer=layer).inc(req.hidden.shape[0] if req.hidden.shape else 0)
        self.latency.observe(seconds)
        self.compute.observe(compute_seconds)


class ExpertLoadCollector:
    """Per-expert load at scrape time, read from the banks' counters (no per-batch work)."""

    def __init__(self, core) -> None:
        self.core = core

    def collect(self):
        family = CounterMetricFamily("epserve_expert_slot_tokens", "tokens routed to each held slot",
                                     labels=["layer", "slot"])
        for layer, (slots, tokens) in sorted(self.core.load().items()):
            for slot, n in zip(slots, tokens, strict=True):
                family.add_metric([str(layer), str(slot)], n)
        yield family


def register_load_collector(core) -> None:
    REGISTRY.register(ExpertLoadCollector(core))
