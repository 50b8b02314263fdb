from services.protos_gen.epserve.v1 import inference_pb2 as _inference_pb2
from services.protos_gen.epserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling", "step_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STEP_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    step_offset: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., step_offset: _Optional[int] = ...) -> None: ...

class DecodeAlive(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    def __init__(self, tokens: _Optional[int] = ...) -> None: ...

class DecodeQueued(_message.Message):
    __slots__ = ("free_blocks", "needed_blocks")
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NEEDED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    free_blocks: int
    needed_blocks: int
    def __init__(self, free_blocks: _Optional[int] = ..., needed_blocks: _Optional[int] = ...) -> None: ...

class DecodeAccepted(_message.Message):
    __slots__ = ("instance_id", "reserved_blocks")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    reserved_blocks: int
    def __init__(self, instance_id: _Optional[str] = ..., reserved_blocks: _Optional[int] = ...) -> None: ...

class DecodeToken(_message.Message):
    __slots__ = ("seq", "token_id", "logprobs")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    token_id: int
    logprobs: _inference_pb2.TokenLogprobs
    def __init__(self, seq: _Optional[int] = ..., token_id: _Optional[int] = ..., logprobs: _Optional[_Union[_inference_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...

class DecodeFinished(_message.Message):
    __slots__ = ("finish_reason", "completion_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    completion_tokens: int
    def __init__(self, finish_reason: _Optional[str] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("accepted", "token", "finished", "queued", "alive")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    accepted: DecodeAccepted
    token: DecodeToken
    finished: DecodeFinished
    queued: DecodeQueued
    alive: DecodeAlive
    def __init__(self, accepted: _Optional[_Union[DecodeAccepted, _Mapping]] = ..., token: _Optional[_Union[DecodeToken, _Mapping]] = ..., finished: _Optional[_Union[DecodeFinished, _Mapping]] = ..., queued: _Optional[_Union[DecodeQueued, _Mapping]] = ..., alive: _Optional[_Union[DecodeAlive, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling", "decode_endpoint", "step_offset", "tenant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STEP_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    decode_endpoint: str
    step_offset: int
    tenant: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., decode_endpoint: _Optional[str] = ..., step_offset: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("instance_id", "first_token", "prompt_tokens", "prefill_seconds", "transfer_seconds", "kv_bytes", "cached_tokens")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    first_token: int
    prompt_tokens: int
    prefill_seconds: float
    transfer_seconds: float
    kv_bytes: int
    cached_tokens: int
    def __init__(self, instance_id: _Optional[str] = ..., first_token: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., prefill_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("request_id", "index", "last", "data", "dtype", "shape", "first_token", "total_bytes", "sha256", "first_token_logprobs", "draft_from", "draft_tokens", "first_draft")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FROM_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_DRAFT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    last: bool
    data: bytes
    dtype: _tensor_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    first_token: int
    total_bytes: int
    sha256: bytes
    first_token_logprobs: _inference_pb2.TokenLogprobs
    draft_from: int
    draft_tokens: int
    first_draft: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., last: _Optional[bool] = ..., data: _Optional[bytes] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., first_token: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., first_token_logprobs: _Optional[_Union[_inference_pb2.TokenLogprobs, _Mapping]] = ..., draft_from: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., first_draft: _Optional[int] = ...) -> None: ...

class KVTransferAck(_message.Message):
    __slots__ = ("request_id", "bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    bytes: int
    def __init__(self, request_id: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...
