from services.protos_gen.epserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DispatchRequest(_message.Message):
    __slots__ = ("step_id", "micro_batch", "layer_id", "placement_version", "hidden", "slots", "weights", "combine_dtype", "trace_tag")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COMBINE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRACE_TAG_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    micro_batch: int
    layer_id: int
    placement_version: int
    hidden: _tensor_pb2.Tensor
    slots: _tensor_pb2.Tensor
    weights: _tensor_pb2.Tensor
    combine_dtype: _tensor_pb2.DType
    trace_tag: str
    def __init__(self, step_id: _Optional[int] = ..., micro_batch: _Optional[int] = ..., layer_id: _Optional[int] = ..., placement_version: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., slots: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., combine_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., trace_tag: _Optional[str] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("step_id", "micro_batch", "layer_id", "combined", "error", "compute_seconds")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    micro_batch: int
    layer_id: int
    combined: _tensor_pb2.Tensor
    error: _tensor_pb2.StreamError
    compute_seconds: float
    def __init__(self, step_id: _Optional[int] = ..., micro_batch: _Optional[int] = ..., layer_id: _Optional[int] = ..., combined: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[_tensor_pb2.StreamError, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class WorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeldSlot(_message.Message):
    __slots__ = ("layer_id", "slot", "logical_expert")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer_id: int
    slot: int
    logical_expert: int
    def __init__(self, layer_id: _Optional[int] = ..., slot: _Optional[int] = ..., logical_expert: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("rank", "device", "placement_version", "slots", "expert_tensors_read", "expert_bytes_read", "resident_bytes", "num_workers")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TENSORS_READ_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    device: str
    placement_version: int
    slots: _containers.RepeatedCompositeFieldContainer[HeldSlot]
    expert_tensors_read: int
    expert_bytes_read: int
    resident_bytes: int
    num_workers: int
    def __init__(self, rank: _Optional[int] = ..., device: _Optional[str] = ..., placement_version: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[HeldSlot, _Mapping]]] = ..., expert_tensors_read: _Optional[int] = ..., expert_bytes_read: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., num_workers: _Optional[int] = ...) -> None: ...

class ExpertLoadRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class LayerLoad(_message.Message):
    __slots__ = ("layer_id", "slots", "tokens")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer_id: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer_id: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("rank", "placement_version", "layers")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    placement_version: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerLoad]
    def __init__(self, rank: _Optional[int] = ..., placement_version: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerLoad, _Mapping]]] = ...) -> None: ...
