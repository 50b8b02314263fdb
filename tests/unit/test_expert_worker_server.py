"""The worker's gRPC shell: where a dispatch's compute runs (event loop or compute thread)."""

from __future__ import annotations

import torch

from services.engine.tensor_proto import to_proto
from services.engine.wire import encode
from services.expert_worker.metrics import WorkerMetrics
from services.expert_worker.server import ExpertWorkerServicer, combine_dtype_proto
from services.protos_gen.epserve.v1 import expert_pb2
from tests.unit.test_expert_worker_versions import CFG, K, make_core

_METRICS = WorkerMetrics()  # Prometheus metrics register once per process


def _request(tokens: int) -> expert_pb2.DispatchRequest:
    gen = torch.Generator().manual_seed(tokens)
    slots = torch.full((tokens, K), -1, dtype=torch.int32)
    slots[:, 0] = torch.arange(tokens, dtype=torch.int32) % 16
    return expert_pb2.DispatchRequest(
        step_id=1, layer_id=1, placement_version=1, combine_dtype=combine_dtype_proto("fp32"),
        hidden=to_proto(encode(torch.randn(tokens, CFG.hidden_size, generator=gen), "fp32")),
        slots=to_proto(encode(slots, "int32")),
        weights=to_proto(encode(torch.rand(tokens, K, generator=gen), "fp32")))


async def test_a_size_measured_short_computes_on_the_event_loop():
    servicer = ExpertWorkerServicer(make_core(), expert_pb2.WorkerInfo(), _METRICS)
    servicer.compute.inline_max_s = 10.0  # every compute here counts as short
    replies = [await servicer._handle(_request(4)) for _ in range(3)]
    assert not any(r.HasField("error") for r in replies)
    # the same input, the same bytes, wherever it ran
    assert [bytes(r.combined.data) for r in replies[1:]] == [bytes(replies[0].combined.data)] * 2
    # first of its size measured on the thread, then on the loop; a new size starts over
    assert (servicer.compute.thread_runs, servicer.compute.inline_runs) == (1, 2)
    await servicer._handle(_request(64))
    assert servicer.compute.thread_runs == 2


async def test_a_long_compute_goes_back_to_the_thread_and_the_flag_forces_it():
    servicer = ExpertWorkerServicer(make_core(), expert_pb2.WorkerInfo(), _METRICS)
    servicer.compute.inline_max_s = 0.0  # nothing is short enough
    for _ in range(3):
        await servicer._handle(_request(4))
    assert servicer.compute.inline_runs == 0
    forced = ExpertWorkerServicer(make_core(), expert_pb2.WorkerInfo(), _METRICS,
                                  compute_thread=True)
    forced.compute.inline_max_s = 10.0
    for _ in range(3):
        await forced._handle(_request(4))
    assert (forced.compute.thread_runs, forced.compute.inline_runs) == (3, 0)
