"""WorkerStream's failure mapping: a stream that breaks under a write is a lost worker."""

from __future__ import annotations

import grpc
import pytest

from services.engine.worker_stream import EPError, WorkerStream, WorkerTiming
from services.protos_gen.epserve.v1 import expert_pb2


class _BrokenCall:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def write(self, req) -> None:
        raise self.exc


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.CANCELLED])
async def test_a_write_on_a_broken_stream_is_a_lost_worker_whatever_the_code(code):
    """INTERNAL is what grpc.aio reports when the worker's process is killed mid-write: the
    step must be redone around the worker, not failed."""
    stream = WorkerStream(3, "127.0.0.1:1")
    try:
        stream.call = _BrokenCall(grpc.aio.AioRpcError(code, grpc.aio.Metadata(),
                                                       grpc.aio.Metadata(), "boom"))
        with pytest.raises(EPError) as info:
            await stream.send(expert_pb2.DispatchRequest(step_id=1), WorkerTiming(worker=3))
        assert info.value.worker_failed and info.value.rank == 3
        assert code.name in str(info.value)
        # every later send fails the same way at once
        with pytest.raises(EPError):
            await stream.send(expert_pb2.DispatchRequest(step_id=2), WorkerTiming(worker=3))
    finally:
        await stream.channel.close()
