from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("broker_up", "broker_version", "queue", "workers", "voices")
    BROKER_UP_FIELD_NUMBER: _ClassVar[int]
    BROKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    VOICES_FIELD_NUMBER: _ClassVar[int]
    broker_up: bool
    broker_version: str
    queue: Queue
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    voices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, broker_up: _Optional[bool] = ..., broker_version: _Optional[str] = ..., queue: _Optional[_Union[Queue, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., voices: _Optional[_Iterable[str]] = ...) -> None: ...

class Queue(_message.Message):
    __slots__ = ("interactive", "bulk", "running")
    INTERACTIVE_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    interactive: int
    bulk: int
    running: int
    def __init__(self, interactive: _Optional[int] = ..., bulk: _Optional[int] = ..., running: _Optional[int] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("name", "engine", "model", "device", "host", "voices", "default_voice", "sample_rate", "capacity", "running", "state", "clone", "jobs_done", "jobs_failed", "gpu", "no_gpu")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    VOICES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VOICE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CLONE_FIELD_NUMBER: _ClassVar[int]
    JOBS_DONE_FIELD_NUMBER: _ClassVar[int]
    JOBS_FAILED_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    NO_GPU_FIELD_NUMBER: _ClassVar[int]
    name: str
    engine: str
    model: str
    device: str
    host: str
    voices: _containers.RepeatedScalarFieldContainer[str]
    default_voice: str
    sample_rate: int
    capacity: int
    running: int
    state: str
    clone: bool
    jobs_done: int
    jobs_failed: int
    gpu: Gpu
    no_gpu: str
    def __init__(self, name: _Optional[str] = ..., engine: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., host: _Optional[str] = ..., voices: _Optional[_Iterable[str]] = ..., default_voice: _Optional[str] = ..., sample_rate: _Optional[int] = ..., capacity: _Optional[int] = ..., running: _Optional[int] = ..., state: _Optional[str] = ..., clone: _Optional[bool] = ..., jobs_done: _Optional[int] = ..., jobs_failed: _Optional[int] = ..., gpu: _Optional[_Union[Gpu, _Mapping]] = ..., no_gpu: _Optional[str] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("name", "memory_used_mb", "memory_total_mb", "utilization_pct", "temperature_c", "power_w")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MB_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_used_mb: float
    memory_total_mb: float
    utilization_pct: float
    temperature_c: float
    power_w: float
    def __init__(self, name: _Optional[str] = ..., memory_used_mb: _Optional[float] = ..., memory_total_mb: _Optional[float] = ..., utilization_pct: _Optional[float] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ...) -> None: ...
