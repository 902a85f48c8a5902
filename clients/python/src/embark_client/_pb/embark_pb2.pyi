from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    F32: _ClassVar[VectorType]
    F16: _ClassVar[VectorType]
    BF16: _ClassVar[VectorType]
    I8: _ClassVar[VectorType]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    CACHE: _ClassVar[Source]
    STORE: _ClassVar[Source]
    OOV_PENDING: _ClassVar[Source]
    OOV_FAILED: _ClassVar[Source]
    OOV_UNAVAILABLE: _ClassVar[Source]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    IMAGE: _ClassVar[ModelKind]
    TEXT: _ClassVar[ModelKind]
F32: VectorType
F16: VectorType
BF16: VectorType
I8: VectorType
SOURCE_UNSPECIFIED: Source
CACHE: Source
STORE: Source
OOV_PENDING: Source
OOV_FAILED: Source
OOV_UNAVAILABLE: Source
MODEL_KIND_UNSPECIFIED: ModelKind
IMAGE: ModelKind
TEXT: ModelKind

class LookupRequest(_message.Message):
    __slots__ = ("model", "keys", "version", "vector_type")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_TYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    version: str
    vector_type: VectorType
    def __init__(self, model: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., vector_type: _Optional[_Union[VectorType, str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("dim", "vectors", "sources", "version", "vector_type", "scales")
    DIM_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    vectors: bytes
    sources: _containers.RepeatedScalarFieldContainer[Source]
    version: str
    vector_type: VectorType
    scales: bytes
    def __init__(self, dim: _Optional[int] = ..., vectors: _Optional[bytes] = ..., sources: _Optional[_Iterable[_Union[Source, str]]] = ..., version: _Optional[str] = ..., vector_type: _Optional[_Union[VectorType, str]] = ..., scales: _Optional[bytes] = ...) -> None: ...

class ModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "dim", "kind", "version", "current", "stored_vectors", "stored_vectors_counted_at_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    STORED_VECTORS_FIELD_NUMBER: _ClassVar[int]
    STORED_VECTORS_COUNTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    kind: ModelKind
    version: str
    current: bool
    stored_vectors: int
    stored_vectors_counted_at_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., version: _Optional[str] = ..., current: bool = ..., stored_vectors: _Optional[int] = ..., stored_vectors_counted_at_unix_ms: _Optional[int] = ...) -> None: ...

class ModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("model", "keys")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("invalidated",)
    INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    invalidated: int
    def __init__(self, invalidated: _Optional[int] = ...) -> None: ...

class SimilarRequest(_message.Message):
    __slots__ = ("model", "version", "key", "vector", "k", "min_score")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    key: str
    vector: bytes
    k: int
    min_score: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., key: _Optional[str] = ..., vector: _Optional[bytes] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class SimilarResponse(_message.Message):
    __slots__ = ("keys", "scores", "exact")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    exact: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., exact: bool = ...) -> None: ...
