"""Generated bad requests against every API of a running cluster (tiny model, every service a
real process): the router's HTTP API (completions and chat) and gRPC `Inference.Generate`, and
the internal RPCs, each called as the role that may call it (with mTLS on, a certificate of
that role): `Decode.Generate` and `Prefill.Prefill` as the router, `Decode.TransferKV` as
prefill, `ExpertWorker.DispatchOnce` as decode.

Every request is bad by construction (tests/fuzz/bad_requests.py) and must get a clean
refusal: an HTTP 4xx whose body is OpenAI's ErrorResponse, or a gRPC status with a message
from the set each API may answer (never UNKNOWN, INTERNAL or a dropped connection). After
all of them every process still runs and is SERVING, and a workload's outputs still equal the
reference engine's. EPSERVE_FUZZ_EXAMPLES sets the number per API (1,000 by default).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from services.common.health import check_health
from services.local.cluster import ClusterSpec
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import (
    expert_pb2,
    expert_pb2_grpc,
    inference_pb2_grpc,
    serving_pb2_grpc,
)
from tests.fuzz import bad_requests as bad
from tests.integration.cluster_helpers import check_invariant, reference, run_remote, start
from tests.integration.cluster_helpers import workload as make_workload
from tests.openai_schema import errors

EXAMPLES = int(os.environ.get("EPSERVE_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAN_PUBLIC = {grpc.StatusCode.INVALID_ARGUMENT}
CLEAN_INTERNAL = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS}
RPC_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start(ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2,
                          http_port=0, max_inflight=64))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> bad.Model:
    cfg = ModelConfig.from_dir(tiny_model_dir)
    moe = cfg.moe_layer_ids
    return bad.Model(vocab=cfg.vocab_size, context=cfg.max_position_embeddings,
                     hidden=cfg.hidden_size, top_k=cfg.num_experts_per_tok, moe_layer=moe[0],
                     dense_layer=next(i for i in range(cfg.num_hidden_layers) if i not in moe))


def channel(cluster, name: str, as_role: str) -> grpc.Channel:
    """A channel to process `name` as a caller of role `as_role` (its certificate when the
    cluster runs mTLS)."""
    tls = getattr(cluster, "tls", None)
    target = cluster.endpoints[name]
    if tls is None:
        return grpc.insecure_channel(target)
    from services.common.mesh_tls import MeshTLS, role_target_options
    from services.local.cluster_tls import role_of_process
    me = MeshTLS.from_dir(tls.dir(tls.add(f"fuzz-{as_role}", as_role)))
    return grpc.secure_channel(target, me.channel_credentials(),
                               options=role_target_options(role_of_process(name)))


def refused_cleanly(call, allowed: set) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    code, details = err.value.code(), err.value.details() or ""
    assert code in allowed, f"{code.name}: {details}"
    assert details.strip(), f"{code.name} without a message"


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=RPC_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_http_bad_bodies_get_4xx_error_responses(cluster, model, chat):
    url = cluster.http_url + ("/v1/chat/completions" if chat else "/v1/completions")

    @FUZZ
    @given(body=bad.bad_http_body(chat, model))
    def one(body):
        status, answer = post(url, body)
        assert 400 <= status < 500, (status, body[:300], answer)
        assert errors("ErrorResponse", answer) == [], answer

    one()


def test_grpc_generate_bad_requests_get_invalid_argument(cluster, model):
    with grpc.insecure_channel(cluster.router_endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        @FUZZ
        @given(req=bad.bad_generate_request(model))
        def one(req):
            refused_cleanly(lambda: list(stub.Generate(req, timeout=RPC_TIMEOUT_S)),
                            CLEAN_PUBLIC)

        one()


def test_decode_generate_bad_requests(cluster, model):
    with channel(cluster, "decode-0", "router") as ch:
        stub = serving_pb2_grpc.DecodeStub(ch)

        @FUZZ
        @given(req=bad.bad_decode_request(model))
        def one(req):
            refused_cleanly(lambda: list(stub.Generate(req, timeout=RPC_TIMEOUT_S)),
                            CLEAN_INTERNAL)

        one()


def test_prefill_bad_requests(cluster, model):
    decode = cluster.endpoints["decode-0"]
    with channel(cluster, "prefill-0", "router") as ch:
        stub = serving_pb2_grpc.PrefillStub(ch)

        @FUZZ
        @given(req=bad.bad_prefill_request(model, decode))
        def one(req):
            refused_cleanly(lambda: stub.Prefill(req, timeout=RPC_TIMEOUT_S), CLEAN_INTERNAL)

        one()


def test_kv_transfers_that_cannot_be_installed(cluster, model):
    with channel(cluster, "decode-0", "prefill") as ch:
        stub = serving_pb2_grpc.DecodeStub(ch)

        @FUZZ
        @given(chunks=bad.bad_kv_transfer(model))
        def one(chunks):
            refused_cleanly(lambda: stub.TransferKV(iter(chunks), timeout=RPC_TIMEOUT_S),
                            CLEAN_INTERNAL)

        one()


def test_expert_dispatches_that_must_be_rejected(cluster, model):
    with channel(cluster, "expert-worker-0", "decode") as ch:
        stub = expert_pb2_grpc.ExpertWorkerStub(ch)
        version = stub.Info(expert_pb2.WorkerInfoRequest(), timeout=RPC_TIMEOUT_S
                            ).placement_version

        @FUZZ
        @given(req=bad.bad_dispatch(model, version))
        def one(req):
            refused_cleanly(lambda: stub.DispatchOnce(req, timeout=RPC_TIMEOUT_S),
                            CLEAN_INTERNAL)

        one()


async def serving(cluster, name: str) -> bool:
    if hasattr(cluster, "check_health"):  # over mTLS when the cluster runs it
        return await cluster.check_health(name, RPC_TIMEOUT_S)
    return await check_health(cluster.endpoints[name], RPC_TIMEOUT_S)


def test_after_the_fuzzing_every_service_runs_and_serves_exactly(cluster, model,
                                                                tiny_model_dir):
    """Last in the module: nothing the bad requests did changed a process or an output."""
    for proc in cluster.group:
        assert proc.is_running(), f"{proc.name} exited"
    for name in cluster.endpoints:
        if not name.startswith("link-proxy"):
            assert asyncio.run(serving(cluster, name)), f"{name} is not SERVING"
    reqs = make_workload(model.vocab, seed=31)
    got = asyncio.run(run_remote(cluster.router_endpoint, reqs, suffix="-after-fuzz"))
    check_invariant(reqs, reference(tiny_model_dir, reqs), got)
