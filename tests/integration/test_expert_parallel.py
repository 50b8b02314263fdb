"""The EP runtime over real expert-worker processes equals the reference engine.

Master invariant for N in {1, 2, 4} workers, with redundant experts, on tiny (also as an FP8
checkpoint, whose experts the workers dequantise) and v3-mini, in
fp32, bf16 and fp8 wire modes (the reference applies the same quantisation). Workers hold only
their slots; malformed dispatches get documented errors and the stream stays usable; a dead
worker is a clear error within the deadline, never a hang. Workers compute on their event loop
by default; one case runs them with a compute thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import torch

from services.common.health import check_health
from services.engine.compare import LOGIT_TOL, assert_same_greedy
from services.engine.compute_thread import compute_thread
from services.engine.ep_client import EPError, ExpertClient
from services.engine.ep_engine import EPEngine
from services.engine.tensor_proto import to_proto
from services.engine.wire import encode
from services.local.expert_workers import LocalExpertWorkers
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2
from tests.integration.ep_helpers import prompts, reference_run, requests, table_for

CASES = [  # (model fixture, workers, redundant, wire modes)
    ("tiny_model_dir", 1, 0, ("fp32",)),
    ("tiny_model_dir", 2, 0, ("fp32", "fp8")),
    ("tiny_model_dir", 4, 4, ("fp32", "bf16")),
    ("tiny_fp8_model_dir", 2, 0, ("fp32",)),  # workers dequantise an FP8 checkpoint's experts
    ("mini_model_dir", 2, 0, ("fp32",)),
    ("mini_model_dir", 4, 8, ("fp32", "bf16", "fp8")),
]


async def ep_run(model_dir, endpoints, reqs, wire):
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, experts=no_experts(cfg))
    client = await ExpertClient.connect(endpoints, wire=wire)
    try:
        return await EPEngine(model, client, record_logits=True).generate(reqs)
    finally:
        await client.close()


@pytest.mark.parametrize("fixture, workers, redundant, wires", CASES,
                         ids=[f"{c[0].removesuffix('_model_dir')}-N{c[1]}-R{c[2]}"
                              for c in CASES])
def test_ep_equals_reference(request, fixture, workers, redundant, wires):
    model_dir = request.getfixturevalue(fixture)
    cfg = ModelConfig.from_dir(model_dir)
    table = table_for(cfg, workers, redundant)
    reqs = requests(prompts(cfg.vocab_size))
    inline_before = compute_thread().inline_runs
    with LocalExpertWorkers(model_dir, table) as pool:
        _assert_workers_hold_only_their_slots(pool.endpoints, table, cfg)
        plain = reference_run(model_dir, reqs)
        for wire in wires:
            want = plain if wire == "fp32" else reference_run(model_dir, reqs, table, wire)
            got = asyncio.run(ep_run(model_dir, pool.endpoints, reqs, wire))
            print(f"{fixture} N={workers} R={redundant} wire={wire}")
            assert_same_greedy([c.token_ids for c in want], [c.token_ids for c in got],
                               [c.logits for c in want], [c.logits for c in got])
            if wire != "fp32":  # the quantisation really happened on both sides
                lossy = max((a.logits[0] - b.logits[0]).abs().max().item()
                            for a, b in zip(plain, got, strict=True))
                assert lossy > LOGIT_TOL, f"{wire} wire indistinguishable from fp32"
    # the outputs above include steps whose hops ran on the event loop (one micro-batch, each
    # hop of these models far under INLINE_MAX_S): that path is exact too
    assert compute_thread().inline_runs > inline_before


def test_compute_thread_equals_reference(tiny_model_dir):
    """Workers computing on a thread of their own (--compute-thread) instead of their event
    loop (the default, which the cases above run) give the same tokens and logits."""
    cfg = ModelConfig.from_dir(tiny_model_dir)
    reqs = requests(prompts(cfg.vocab_size))
    with LocalExpertWorkers(tiny_model_dir, table_for(cfg, 2),
                            extra_args=("--compute-thread",)) as pool:
        want = reference_run(tiny_model_dir, reqs)
        got = asyncio.run(ep_run(tiny_model_dir, pool.endpoints, reqs, "fp32"))
    assert_same_greedy([c.token_ids for c in want], [c.token_ids for c in got],
                       [c.logits for c in want], [c.logits for c in got])


def _assert_workers_hold_only_their_slots(endpoints, table, cfg):
    for rank, target in enumerate(endpoints):
        with grpc.insecure_channel(target) as ch:
            info = expert_pb2_grpc.ExpertWorkerStub(ch).Info(expert_pb2.WorkerInfoRequest())
        held = {(s.layer_id, s.slot, s.logical_expert) for s in info.slots}
        want = {(layer, s, table.phy2log[i][s]) for i, layer in enumerate(table.layer_ids)
                for s in table.slots_of_worker(rank)}
        assert held == want
        # three weight tensors (gate, up, down) per held slot, each with its scale when FP8,
        # nothing else
        per_slot = 6 if cfg.fp8_weight_block else 3
        assert info.expert_tensors_read == per_slot * len(want)
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2  # bf16 or fp32 bytes
        assert info.expert_bytes_read <= len(want) * per_expert * 2


@pytest.fixture(scope="module")
def tiny_pool(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    with LocalExpertWorkers(tiny_model_dir, table_for(cfg, 2)) as pool:
        yield pool, cfg


def _request(cfg, **over):
    k, H = cfg.num_experts_per_tok, cfg.hidden_size
    slots = torch.full((3, k), -1, dtype=torch.int32)
    slots[:, 0] = torch.tensor([0, 1, 2], dtype=torch.int32)
    req = dict(step_id=1, micro_batch=0, layer_id=cfg.moe_layer_ids[0], placement_version=1,
               hidden=to_proto(encode(torch.randn(3, H), "fp32")),
               slots=to_proto(encode(slots, "int32")),
               weights=to_proto(encode(torch.ones(3, k), "fp32")),
               combine_dtype=tensor_pb2.DTYPE_FP32)
    req.update(over)
    return expert_pb2.DispatchRequest(**req)


def _bad_requests(cfg):
    k, H = cfg.num_experts_per_tok, cfg.hidden_size
    held_elsewhere = torch.full((3, k), -1, dtype=torch.int32)
    held_elsewhere[:, 0] = cfg.n_routed_experts - 1  # lives on rank 1
    return {
        "wrong shape": (_request(cfg, hidden=to_proto(encode(torch.randn(3, H + 1), "fp32"))),
                        "INVALID_ARGUMENT", "hidden must be"),
        "unknown slot": (_request(cfg, slots=to_proto(encode(held_elsewhere, "int32"))),
                         "INVALID_ARGUMENT", "not held by rank 0"),
        "stale placement": (_request(cfg, placement_version=7), "FAILED_PRECONDITION",
                            "placement version 7"),
        "bad dtype": (_request(cfg, hidden=tensor_pb2.Tensor(dtype=99, shape=[3, H], data=b"x")),
                      "INVALID_ARGUMENT", "dtype"),
        "truncated bytes": (_request(cfg, hidden=tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_FP32, shape=[3, H], data=b"\0" * 8)), "INVALID_ARGUMENT", "bytes"),
        "not a MoE layer": (_request(cfg, layer_id=0), "INVALID_ARGUMENT", "not a MoE layer"),
    }


def test_bad_dispatch_on_stream_gets_inband_errors_and_stream_survives(tiny_pool):
    pool, cfg = tiny_pool
    bad = _bad_requests(cfg)
    with grpc.insecure_channel(pool.endpoints[0]) as ch:
        stub = expert_pb2_grpc.ExpertWorkerStub(ch)
        msgs = [r for r, _, _ in bad.values()] + [_request(cfg)]
        replies = list(stub.Dispatch(iter(msgs), timeout=30))
    assert len(replies) == len(msgs)
    for (name, (_, code, text)), reply in zip(bad.items(), replies, strict=False):
        assert reply.error.code == code, name
        assert text in reply.error.message, (name, reply.error.message)
    assert not replies[-1].HasField("error") and tuple(replies[-1].combined.shape) == (3, cfg.hidden_size)
    assert asyncio.run(check_health(pool.endpoints[0], 5.0))


@pytest.mark.parametrize("name", ["wrong shape", "unknown slot", "stale placement", "bad dtype"])
def test_bad_dispatch_unary_gets_status_code(tiny_pool, name):
    pool, cfg = tiny_pool
    req, code, text = _bad_requests(cfg)[name]
    with grpc.insecure_channel(pool.endpoints[0]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            expert_pb2_grpc.ExpertWorkerStub(ch).DispatchOnce(req, timeout=30)
    assert err.value.code().name == code and text in err.value.details()


def test_dead_worker_is_a_clear_error_not_a_hang(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    reqs = requests(prompts(cfg.vocab_size), max_tokens=40)

    async def run(endpoints, kill_pid):
        model = load_model(tiny_model_dir, experts=no_experts(cfg))
        client = await ExpertClient.connect(endpoints, timeout_s=5.0)
        engine = EPEngine(model, client)
        os.kill(kill_pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            with pytest.raises(EPError, match="expert worker 1"):
                await engine.generate(reqs)
        finally:
            await client.close()
        return time.monotonic() - t0

    with LocalExpertWorkers(tiny_model_dir, table_for(cfg, 2)) as pool:
        elapsed = asyncio.run(run(pool.endpoints, pool.pid(1)))
    assert elapsed < 10.0
