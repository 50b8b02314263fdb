from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_ROUTER: _ClassVar[Role]
    ROLE_SCHEDULER: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_EXPERT_WORKER: _ClassVar[Role]
    ROLE_LEDGER: _ClassVar[Role]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[InstanceState]
    STATE_STARTING: _ClassVar[InstanceState]
    STATE_SERVING: _ClassVar[InstanceState]
    STATE_DRAINING: _ClassVar[InstanceState]
    STATE_DEAD: _ClassVar[InstanceState]
ROLE_UNSPECIFIED: Role
ROLE_ROUTER: Role
ROLE_SCHEDULER: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_EXPERT_WORKER: Role
ROLE_LEDGER: Role
STATE_UNSPECIFIED: InstanceState
STATE_STARTING: InstanceState
STATE_SERVING: InstanceState
STATE_DRAINING: InstanceState
STATE_DEAD: InstanceState

class InstanceLoad(_message.Message):
    __slots__ = ("queued_requests", "queued_tokens", "attention_cost", "running_requests", "kv_blocks_in_use", "kv_blocks_total", "acked_seq", "kv_block_size")
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_COST_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    queued_requests: int
    queued_tokens: int
    attention_cost: float
    running_requests: int
    kv_blocks_in_use: int
    kv_blocks_total: int
    acked_seq: int
    kv_block_size: int
    def __init__(self, queued_requests: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., attention_cost: _Optional[float] = ..., running_requests: _Optional[int] = ..., kv_blocks_in_use: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., acked_seq: _Optional[int] = ..., kv_block_size: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("instance_id", "role", "endpoint", "state", "rank", "placement_version", "load", "sent_at", "metrics_endpoint", "started_at")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: Role
    endpoint: str
    state: InstanceState
    rank: int
    placement_version: int
    load: InstanceLoad
    sent_at: float
    metrics_endpoint: str
    started_at: float
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., endpoint: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., rank: _Optional[int] = ..., placement_version: _Optional[int] = ..., load: _Optional[_Union[InstanceLoad, _Mapping]] = ..., sent_at: _Optional[float] = ..., metrics_endpoint: _Optional[str] = ..., started_at: _Optional[float] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("last", "state", "first_seen", "last_seen")
    LAST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    last: Heartbeat
    state: InstanceState
    first_seen: float
    last_seen: float
    def __init__(self, last: _Optional[_Union[Heartbeat, _Mapping]] = ..., state: _Optional[_Union[InstanceState, str]] = ..., first_seen: _Optional[float] = ..., last_seen: _Optional[float] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("version", "num_workers", "num_logical_experts", "layer_ids", "phy2log", "worker_endpoints", "lost_ranks")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    WORKER_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    LOST_RANKS_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_workers: int
    num_logical_experts: int
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    phy2log: _containers.RepeatedScalarFieldContainer[int]
    worker_endpoints: _containers.RepeatedScalarFieldContainer[str]
    lost_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., num_workers: _Optional[int] = ..., num_logical_experts: _Optional[int] = ..., layer_ids: _Optional[_Iterable[int]] = ..., phy2log: _Optional[_Iterable[int]] = ..., worker_endpoints: _Optional[_Iterable[str]] = ..., lost_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("request_id", "model", "started_at", "finished_at", "prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens", "finish_reason", "prefill_instance", "decode_instance", "time_to_first_token_s", "usage_id", "migrations", "tenant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_MISS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    USAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    started_at: float
    finished_at: float
    prompt_tokens: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    completion_tokens: int
    finish_reason: str
    prefill_instance: str
    decode_instance: str
    time_to_first_token_s: float
    usage_id: str
    migrations: int
    tenant: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., prompt_cache_hit_tokens: _Optional[int] = ..., prompt_cache_miss_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., prefill_instance: _Optional[str] = ..., decode_instance: _Optional[str] = ..., time_to_first_token_s: _Optional[float] = ..., usage_id: _Optional[str] = ..., migrations: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class ExpertLoadReport(_message.Message):
    __slots__ = ("rank", "placement_version", "window_start", "window_end", "layer_ids", "slots", "tokens", "num_logical_experts", "logical_tokens")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    placement_version: int
    window_start: float
    window_end: float
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    num_logical_experts: int
    logical_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rank: _Optional[int] = ..., placement_version: _Optional[int] = ..., window_start: _Optional[float] = ..., window_end: _Optional[float] = ..., layer_ids: _Optional[_Iterable[int]] = ..., slots: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., num_logical_experts: _Optional[int] = ..., logical_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class OverlapPlan(_message.Message):
    __slots__ = ("version", "micro_batches", "split_policy", "min_batch_tokens", "fixed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_POLICY_FIELD_NUMBER: _ClassVar[int]
    MIN_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    version: int
    micro_batches: int
    split_policy: str
    min_batch_tokens: int
    fixed: bool
    def __init__(self, version: _Optional[int] = ..., micro_batches: _Optional[int] = ..., split_policy: _Optional[str] = ..., min_batch_tokens: _Optional[int] = ..., fixed: _Optional[bool] = ...) -> None: ...

class PrefixCacheKeys(_message.Message):
    __slots__ = ("instance_id", "model_fingerprint", "key_prefixes", "sent_at", "kv_layout")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model_fingerprint: str
    key_prefixes: bytes
    sent_at: float
    kv_layout: str
    def __init__(self, instance_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., key_prefixes: _Optional[bytes] = ..., sent_at: _Optional[float] = ..., kv_layout: _Optional[str] = ...) -> None: ...
