"""embark-client: the Python client of EmbArk, the embedding cache.

    from embark_client import EmbArk
    with EmbArk("127.0.0.1:50051") as embark:
        matrix = embark.lookup("minilm-l6-v2", ["a red shoe", "a blue shoe"]).matrix

:class:`EmbArk` blocks; :class:`AsyncEmbArk` is its asyncio twin. Results
are plain dataclasses over numpy arrays (:mod:`embark_client.results`);
failures are typed exceptions (:mod:`embark_client.errors`).
"""

from ._channel import TLS
from .aio import AsyncEmbArk
from .client import EmbArk
from .errors import (
    DeadlineExceeded,
    EmbArkError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotSupported,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .results import LookupResult, ModelInfo, ModelKind, Neighbour, SimilarResult, Source

__all__ = [
    "EmbArk",
    "AsyncEmbArk",
    "TLS",
    "LookupResult",
    "SimilarResult",
    "Neighbour",
    "ModelInfo",
    "ModelKind",
    "Source",
    "EmbArkError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "ResourceExhausted",
    "DeadlineExceeded",
    "NotSupported",
    "ProtocolError",
]
