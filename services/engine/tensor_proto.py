"""WireTensor <-> epserve.v1.Tensor (the only place that knows both)."""

from __future__ import annotations

from services.engine.wire import WireError, WireTensor
from services.protos_gen.epserve.v1 import tensor_pb2

_TO_PROTO = {
    "fp32": tensor_pb2.DTYPE_FP32,
    "bf16": tensor_pb2.DTYPE_BF16,
    "fp8": tensor_pb2.DTYPE_FP8_E4M3,
    "int32": tensor_pb2.DTYPE_INT32,
    "int64": tensor_pb2.DTYPE_INT64,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


def dtype_to_proto(name: str) -> int:
    return _TO_PROTO[name]


def dtype_from_proto(value: int) -> str:
    if value not in _FROM_PROTO:
        raise WireError(f"unsupported tensor dtype {tensor_pb2.DType.Name(value) if value in tensor_pb2.DType.values() else value}")
    return _FROM_PROTO[value]


def proto_fields(t: WireTensor) -> dict:
    """A Tensor field's value as keyword arguments: a message built with nested dicts skips
    building each Tensor and copying it in (measured: 5x cheaper for a DispatchRequest)."""
    return {"dtype": _TO_PROTO[t.dtype], "shape": t.shape, "data": t.data, "scales": t.scales}


def to_proto(t: WireTensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(**proto_fields(t))


def from_proto(p: tensor_pb2.Tensor) -> WireTensor:
    return WireTensor(dtype_from_proto(p.dtype), tuple(p.shape), p.data, p.scales)
