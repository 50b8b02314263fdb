"""The mesh's role table (pure) and its interceptor on an in-process mTLS server."""

from __future__ import annotations

import grpc
import pytest

from services.common.authz import ROLE_TABLE, allowed_roles, authorize
from services.common.certs import Identity, make_certs
from services.common.channels import dial, new_server
from services.common.health import add_health, check_health
from services.common.mesh_tls import MeshTLS
from services.protos_gen.epserve.v1 import expert_pb2, serving_pb2, serving_pb2_grpc

TRANSFER = "/epserve.v1.Decode/TransferKV"
GENERATE = "/epserve.v1.Decode/Generate"
PREFILL = "/epserve.v1.Prefill/Prefill"
DISPATCH = "/epserve.v1.ExpertWorker/Dispatch"


@pytest.mark.parametrize("method,role", [
    (TRANSFER, "prefill"), (GENERATE, "router"), (PREFILL, "router"),
    (DISPATCH, "prefill"), (DISPATCH, "decode"),
    ("/epserve.v1.ExpertWorker/Info", "scheduler"), ("/epserve.v1.ExpertWorker/Load", "operator"),
    ("/grpc.health.v1.Health/Check", "ledger"), ("/grpc.health.v1.Health/Watch", "operator"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "expert-worker"),
])
def test_allowed(method, role):
    assert authorize(method, role, "x-0") is None


@pytest.mark.parametrize("method,role,needed", [
    (TRANSFER, "router", "prefill"), (TRANSFER, "decode", "prefill"),
    (GENERATE, "prefill", "router"), (PREFILL, "decode", "router"),
    (DISPATCH, "router", "prefill or decode"), (DISPATCH, "operator", "prefill or decode"),
    ("/epserve.v1.ExpertWorker/DispatchOnce", "scheduler", "prefill or decode"),
])
def test_denied_names_the_roles_required(method, role, needed):
    denied = authorize(method, role, "x-0")
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert f"may be called only by {needed}" in denied.message
    assert f"the peer is {role} (x-0)" in denied.message


def test_no_role_is_unauthenticated_and_unknown_methods_are_closed():
    assert authorize(TRANSFER, None).code == grpc.StatusCode.UNAUTHENTICATED
    denied = authorize("/epserve.v1.Decode/Brand_new", "router")
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED and "not in the role table" in denied.message
    assert allowed_roles("/epserve.v1.Nope/X") is None
    assert allowed_roles("no-slash") is None


def test_every_served_method_is_in_the_table():
    from services.protos_gen.epserve.v1 import expert_pb2 as e
    from services.protos_gen.epserve.v1 import serving_pb2 as s
    for module, service in ((s, "Decode"), (s, "Prefill"), (e, "ExpertWorker")):
        desc = module.DESCRIPTOR.services_by_name[service]
        for m in desc.methods:
            assert allowed_roles(f"/{desc.full_name}/{m.name}", ROLE_TABLE), m.full_name


class _Decode(serving_pb2_grpc.DecodeServicer):
    async def TransferKV(self, request_iterator, context):  # noqa: N802
        async for _ in request_iterator:
            pass
        return serving_pb2.KVTransferAck(bytes=42)

    async def Generate(self, request, context):  # noqa: N802 (a streaming handler)
        yield serving_pb2.DecodeEvent()


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    dirs = make_certs(root, [Identity(n, n.rsplit("-", 1)[0], n)
                             for n in ("decode-0", "prefill-0", "router-0", "operator-x")])
    return {n: MeshTLS.from_dir(d) for n, d in dirs.items()}


async def _chunks():
    yield serving_pb2.KVChunk()


async def test_interceptor_on_a_real_mtls_server(ids):
    server = new_server(mesh=True)
    health = await add_health(server)
    await health.set_serving()
    serving_pb2_grpc.add_DecodeServicer_to_server(_Decode(), server)
    port = server.add_secure_port("127.0.0.1:0", ids["decode-0"].server_credentials())
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        async with dial(target, "decode", ids["prefill-0"]) as ch:
            ack = await serving_pb2_grpc.DecodeStub(ch).TransferKV(_chunks(), timeout=10)
            assert ack.bytes == 42
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in serving_pb2_grpc.DecodeStub(ch).Generate(
                        serving_pb2.DecodeRequest(), timeout=10):
                    pass
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only by router" in err.value.details()
        async with dial(target, "decode", ids["router-0"]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await serving_pb2_grpc.DecodeStub(ch).TransferKV(_chunks(), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only by prefill; the peer is router (router-0)" in err.value.details()
            events = [e async for e in serving_pb2_grpc.DecodeStub(ch).Generate(
                serving_pb2.DecodeRequest(), timeout=10)]
            assert len(events) == 1
        # any CA-signed peer may ask for health; expecting another role fails the handshake
        assert await check_health(target, 5, tls=ids["operator-x"], role="decode")
        assert not await check_health(target, 1, tls=ids["operator-x"], role="prefill")
        # no client certificate: the handshake itself fails
        creds = grpc.ssl_channel_credentials(ids["decode-0"].ca_pem)
        async with grpc.aio.secure_channel(target, creds, options=(
                ("grpc.ssl_target_name_override", "decode.role.epserve"),)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await serving_pb2_grpc.DecodeStub(ch).TransferKV(_chunks(), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_expert_protos_import():  # the table's expert methods exist in the generated code
    assert expert_pb2.DESCRIPTOR.services_by_name["ExpertWorker"]


async def test_plaintext_health_port_mirrors_the_main_servers_health():
    """`--health-port`: what a Kubernetes probe (no client certificate) reaches."""
    main, probe = new_server(mesh=True), new_server()
    health, mirrored = await add_health(main), await add_health(probe)
    health.mirror = mirrored
    port = probe.add_insecure_port("127.0.0.1:0")
    await probe.start()
    target = f"127.0.0.1:{port}"
    try:
        assert not await check_health(target, 2)
        await health.set_serving()
        assert await check_health(target, 2)
        await health.enter_graceful_shutdown()
        assert not await check_health(target, 2)
    finally:
        await probe.stop(0)
