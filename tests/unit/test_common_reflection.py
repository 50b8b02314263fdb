"""Reflection lists exactly what a server registered (services/common/reflection.py)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.common.channels import new_server
from services.common.health import add_health
from services.common.reflection import HEALTH_SERVICE, ServiceNames, add_reflection
from services.protos_gen.epserve.v1 import inference_pb2_grpc, serving_pb2_grpc


async def test_the_names_registered_through_the_stand_in_are_listed():
    server = new_server()
    await add_health(server)
    registered = ServiceNames(server)
    inference_pb2_grpc.add_InferenceServicer_to_server(inference_pb2_grpc.InferenceServicer(),
                                                       registered)
    serving_pb2_grpc.add_DecodeServicer_to_server(serving_pb2_grpc.DecodeServicer(), registered)
    assert registered.names == ["epserve.v1.Inference", "epserve.v1.Decode"]
    listed = add_reflection(server, registered.names)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    def list_services() -> list[str]:  # grpcio's own sync reflection client, off the loop
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())

    try:
        services = await asyncio.wait_for(asyncio.to_thread(list_services), 30)
    finally:
        await server.stop(None)
    assert sorted(services) == sorted(listed)
    assert {"epserve.v1.Inference", "epserve.v1.Decode", HEALTH_SERVICE} <= set(services)
    assert "epserve.v1.Prefill" not in services  # only what this server serves


async def test_the_stand_in_passes_everything_else_to_the_server():
    # grpc.aio builds its server on the running loop (a plain test may have none left)
    server = new_server()
    registered = ServiceNames(server)
    assert registered.add_insecure_port("127.0.0.1:0") > 0
