"""Service-to-service mTLS on a real cluster (LocalCluster's default): the cluster serves
requests equal to the reference engine's, and the mesh refuses what it must: an internal RPC
without a client certificate, a certificate of the wrong role (PERMISSION_DENIED naming the
role required), a prefill told to push KV to a host that is not a decode member, a NATS client
without a certificate, and a role writing the scheduler's keys."""

from __future__ import annotations

import asyncio

import grpc
import nats
import pytest

from services.common import subjects
from services.common.channels import dial
from services.common.mesh_tls import MeshTLS
from services.engine.sampling import SamplingParams
from services.engine.sampling_proto import params_to_proto
from services.local.cluster import ClusterSpec
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import (
    expert_pb2,
    expert_pb2_grpc,
    serving_pb2,
    serving_pb2_grpc,
)
from tests.integration.cluster_helpers import (
    check_invariant,
    reference,
    run_remote,
    start,
    workload,
)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start(ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2))
    yield c
    c.stop()


def identity(cluster, name: str) -> MeshTLS:
    return MeshTLS.from_dir(cluster.tls.dir(name))


async def _one_chunk():
    yield serving_pb2.KVChunk(request_id="intruder")


def test_mtls_is_on_and_requests_equal_the_reference(cluster, tiny_model_dir):
    assert cluster.tls is not None
    reqs = workload(ModelConfig.from_dir(tiny_model_dir).vocab_size, seed=21)[:3]
    got = asyncio.run(run_remote(cluster.router_endpoint, reqs))
    check_invariant(reqs, reference(tiny_model_dir, reqs), got)


def test_internal_rpc_without_a_client_certificate_fails_the_handshake(cluster):
    async def go(make_channel):
        async with make_channel() as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await serving_pb2_grpc.DecodeStub(ch).TransferKV(_one_chunk(), timeout=5)
            return err.value

    target = cluster.endpoints["decode-0"]
    plain = asyncio.run(go(lambda: grpc.aio.insecure_channel(target)))
    assert plain.code() == grpc.StatusCode.UNAVAILABLE
    # TLS that trusts the CA but presents no certificate: still no handshake
    ca = identity(cluster, "operator").ca_pem
    server_only = asyncio.run(go(lambda: grpc.aio.secure_channel(
        target, grpc.ssl_channel_credentials(ca),
        options=(("grpc.ssl_target_name_override", "decode.role.epserve"),))))
    assert server_only.code() == grpc.StatusCode.UNAVAILABLE


def test_another_roles_certificate_is_permission_denied_naming_the_role(cluster):
    router = identity(cluster, "router-0")

    async def go():
        async with dial(cluster.endpoints["decode-0"], "decode", router) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as kv:
                await serving_pb2_grpc.DecodeStub(ch).TransferKV(_one_chunk(), timeout=10)
        async with dial(cluster.endpoints["expert-worker-0"], "expert-worker", router) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as dispatch:
                await expert_pb2_grpc.ExpertWorkerStub(ch).DispatchOnce(
                    expert_pb2.DispatchRequest(), timeout=10)
        async with dial(cluster.endpoints["prefill-0"], "prefill",
                        identity(cluster, "decode-0")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as prefill:
                await serving_pb2_grpc.PrefillStub(ch).Prefill(
                    serving_pb2.PrefillRequest(request_id="x", prompt_ids=[5]), timeout=10)
        return kv.value, dispatch.value, prefill.value

    kv, dispatch, prefill = asyncio.run(go())
    for err in (kv, dispatch, prefill):
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert "only by prefill; the peer is router (router-0)" in kv.details()
    assert "only by prefill or decode" in dispatch.details()
    assert "only by router; the peer is decode (decode-0)" in prefill.details()


def test_prefill_refuses_a_decode_endpoint_that_is_not_a_member(cluster):
    async def go():
        async with dial(cluster.endpoints["prefill-0"], "prefill",
                        identity(cluster, "router-0")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await serving_pb2_grpc.PrefillStub(ch).Prefill(serving_pb2.PrefillRequest(
                    request_id="rogue-1", prompt_ids=[5, 6, 7],
                    sampling=params_to_proto(SamplingParams(max_tokens=2)),
                    decode_endpoint=cluster.endpoints["expert-worker-0"]), timeout=20)
        return err.value

    err = asyncio.run(go())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rogue-1" in err.details() and "is not a decode instance" in err.details()


def test_nats_needs_a_certificate_and_enforces_roles(cluster):
    async def go():
        with pytest.raises(Exception):  # noqa: B017 (TLS required: any connect error)
            await nats.connect(cluster.nats_url, connect_timeout=2, allow_reconnect=False,
                               max_reconnect_attempts=0)
        errors = []

        async def on_error(exc):
            errors.append(str(exc))

        nc = await nats.connect(cluster.nats_url, allow_reconnect=False, error_cb=on_error,
                                tls=identity(cluster, "decode-0").ssl_context())
        try:
            js = nc.jetstream(timeout=3)
            kv = await js.key_value(subjects.TOPOLOGY_BUCKET)
            assert await kv.get(subjects.TOPOLOGY_KEY)  # reading the topology: allowed
            with pytest.raises(Exception):  # noqa: B017 (no reply: the publish is dropped)
                await kv.put(subjects.TOPOLOGY_KEY, b"rogue topology")
            await nc.publish(subjects.heartbeat("prefill", "spoofed"), b"x")
            await nc.flush()
            await asyncio.sleep(0.3)
        finally:
            await nc.close()
        return errors

    errors = asyncio.run(go())
    errors = [e.lower() for e in errors]  # nats-py lower-cases the server's message
    assert any("permissions violation" in e and "$kv.epserve_topology" in e for e in errors)
    assert any("permissions violation" in e and "heartbeat.prefill" in e for e in errors)
