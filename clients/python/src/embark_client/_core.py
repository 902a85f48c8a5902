"""What the sync and async clients share: each method as a *plan*, the
retry policy, and the checks of the constructor's arguments.

A plan is a generator that yields the RPCs a method needs (a long Lookup
needs several) and receives their answers, then returns the method's
result. The sync client drives it with blocking calls and the async client
with awaits, so batching, decoding and validation are written once and
cannot drift apart between the two.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Any, Generator, Iterable, Optional, Sequence, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from ._pb import embark_pb2 as pb
from .errors import ProtocolError
from .results import LookupResult, ModelInfo, ModelKind, Neighbour, SimilarResult

T = TypeVar("T")

#: The server's default ``--max-batch-keys``; a client batch above it would
#: be refused by a default server, so it is the largest this client accepts.
SERVER_MAX_BATCH_KEYS = 4096

#: Keys per request unless told: well under the server's limit, and the
#: answer of a 1280-d model stays about 1.3 MiB (as `embark get` does).
DEFAULT_MAX_BATCH_KEYS = 256

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

#: What the server's refusal of an oversized batch names (RESOURCE_EXHAUSTED
#: too, but the same request can never succeed: not retried).
BATCH_LIMIT_FLAG = "--max-batch-keys"


@dataclass(frozen=True)
class Call:
    """One RPC a plan needs: the method's name on the stub and its request."""

    method: str
    request: Any


#: A method's logic: yields Calls, is sent their replies, returns T.
Plan = Generator[Call, Any, T]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by the
    call's deadline.

    Full jitter (a uniform pause between 0 and the exponential bound)
    spreads the retries of many rankers that failed at the same moment, so
    a restarting server is not hit by them in lockstep.
    """

    retries: int
    backoff: float
    max_backoff: float

    def pause(
        self, code: Optional[grpc.StatusCode], retry: int, remaining: float, message: str = ""
    ) -> Optional[float]:
        """How long to wait before retry number ``retry`` (0-based) after a
        failure with ``code`` and ``message``, or None to give up: the code
        is final, the request is over the server's batch limit, the retries
        are spent, or the pause would outlast the deadline."""
        if code not in _RETRYABLE or retry >= self.retries:
            return None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and BATCH_LIMIT_FLAG in message:
            return None
        pause = random.uniform(0.0, min(self.max_backoff, self.backoff * (2.0**retry)))
        return pause if pause < remaining else None


@dataclass(frozen=True)
class Settings:
    """The checked constructor arguments both clients keep."""

    timeout: float
    retry: RetryPolicy
    max_batch_keys: int

    @classmethod
    def check(cls, timeout: float, retries: int, max_batch_keys: int, backoff: float, max_backoff: float) -> "Settings":
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        if not 1 <= max_batch_keys <= SERVER_MAX_BATCH_KEYS:
            raise ValueError(
                f"max_batch_keys must be 1 to {SERVER_MAX_BATCH_KEYS} (and at most the server's "
                f"--max-batch-keys), got {max_batch_keys!r}"
            )
        if not 0 <= backoff <= max_backoff:
            raise ValueError(f"need 0 <= backoff <= max_backoff, got {backoff!r} and {max_backoff!r}")
        return cls(timeout, RetryPolicy(retries, backoff, max_backoff), max_batch_keys)

    def call_timeout(self, timeout: Optional[float]) -> float:
        """The deadline of one method call (its retries included)."""
        if timeout is None:
            return self.timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        return timeout


#: The row types a Lookup may ask for, by the name ``dtype=`` takes.
DTYPES = {"f32": pb.F32, "f16": pb.F16, "bf16": pb.BF16, "i8": pb.I8}


def _check_options(version: Optional[str], dtype: str) -> None:
    # Refused before anything is sent.
    if version is not None and (not isinstance(version, str) or not version):
        raise ValueError(f"version must be a non-empty string (as models() lists it) or None, got {version!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _batches(keys: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    return (keys[start : start + size] for start in range(0, len(keys), size))


def _decode(reply: Any, rows: int, dtype: str = "f32") -> tuple[npt.NDArray[Any], npt.NDArray[np.int32]]:
    """The matrix of a LookupResponse and its sources, after checking the
    shape the contract promises: a wrong size would otherwise show up as a
    reshape error, or worse, as rows of another key.

    f32 and f16 are zero-copy read-only views over the answer's bytes;
    bf16 (which numpy lacks) is widened to float32 and i8 scaled back to
    float32 by its per-row scales, both into new arrays."""
    dim = int(reply.dim)
    vectors: bytes = reply.vectors
    width = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1}[dtype]
    asked = DTYPES[dtype]
    if int(reply.vector_type) != asked:
        raise ProtocolError(f"asked for {dtype} rows, answered with type {int(reply.vector_type)}", method="Lookup")
    if len(reply.sources) != rows or len(vectors) != rows * dim * width:
        raise ProtocolError(
            f"{rows} keys answered with {len(reply.sources)} sources and {len(vectors)} bytes of {dim}-d {dtype} rows",
            method="Lookup",
        )
    sources = np.array(reply.sources, dtype=np.int32)
    if dtype == "f32":
        return np.frombuffer(vectors, dtype="<f4").reshape(rows, dim), sources
    if dtype == "f16":
        return np.frombuffer(vectors, dtype="<f2").reshape(rows, dim), sources
    if dtype == "bf16":
        wide = np.frombuffer(vectors, dtype="<u2").astype(np.uint32) << np.uint32(16)
        return wide.view(np.float32).reshape(rows, dim), sources
    scales: bytes = reply.scales
    if len(scales) != rows * 4:
        raise ProtocolError(f"{rows} i8 rows answered with {len(scales)} bytes of scales", method="Lookup")
    quantized = np.frombuffer(vectors, dtype=np.int8).reshape(rows, dim).astype(np.float32)
    return quantized * np.frombuffer(scales, dtype="<f4")[:, None], sources


def lookup(
    model: str, keys: Sequence[str], max_batch_keys: int, version: Optional[str], dtype: str
) -> Plan[LookupResult]:
    _check_options(version, dtype)
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of strings, not one string")
    keys = list(keys)
    if len(keys) <= max_batch_keys:
        request = pb.LookupRequest(model=model, keys=keys, version=version or "", vector_type=DTYPES[dtype])
        reply = yield Call("Lookup", request)
        return LookupResult.of(*_decode(reply, len(keys), dtype), version=reply.version)
    # Several requests. Each key is asked once, so duplicates get the same
    # row even across batches (the server promises it within one request
    # only) and no batch carries a key twice. The batches after the first
    # ask for the version the first was answered from: a promote between
    # two batches must not mix two versions' vectors in one matrix.
    unique = list(dict.fromkeys(keys))
    parts = []
    answered = version or ""
    for batch in _batches(unique, max_batch_keys):
        request = pb.LookupRequest(model=model, keys=batch, version=answered, vector_type=DTYPES[dtype])
        reply = yield Call("Lookup", request)
        if answered and reply.version and reply.version != answered:
            raise ProtocolError(f"asked for version {answered!r}, answered from {reply.version!r}", method="Lookup")
        answered = answered or reply.version
        parts.append(_decode(reply, len(batch), dtype))
    dims = {m.shape[1] for m, _ in parts}
    if len(dims) != 1:
        raise ProtocolError(f"the batches of one Lookup came back with different dims {sorted(dims)}", method="Lookup")
    matrix = np.concatenate([m for m, _ in parts])
    sources = np.concatenate([s for _, s in parts])
    if len(unique) < len(keys):
        position = {key: i for i, key in enumerate(unique)}
        rows = np.fromiter((position[key] for key in keys), dtype=np.intp, count=len(keys))
        matrix, sources = matrix[rows], sources[rows]
    return LookupResult.of(matrix, sources, version=answered)


def similar(
    model: str,
    key: Optional[str],
    vector: Optional[npt.ArrayLike],
    k: int,
    min_score: float,
    version: Optional[str] = None,
) -> Plan[SimilarResult]:
    _check_options(version, "f32")
    if (key is None) == (vector is None):
        raise ValueError("give exactly one query: key= (a key with a stored vector) or vector= (the model's dim)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if vector is not None:
        query = np.ascontiguousarray(vector, dtype="<f4")
        if query.ndim != 1:
            raise ValueError(f"vector must be one row (1-d), got shape {query.shape}")
        request = pb.SimilarRequest(
            model=model, vector=query.tobytes(), k=k, min_score=min_score, version=version or ""
        )
    else:
        request = pb.SimilarRequest(model=model, key=key, k=k, min_score=min_score, version=version or "")
    reply = yield Call("Similar", request)
    if len(reply.keys) != len(reply.scores):
        raise ProtocolError(f"{len(reply.keys)} keys with {len(reply.scores)} scores", method="Similar")
    neighbours = [Neighbour(found, float(score)) for found, score in zip(reply.keys, reply.scores)]
    return SimilarResult(neighbours=neighbours, exact=bool(reply.exact))


def invalidate(model: str, keys: Sequence[str], max_batch_keys: int) -> Plan[int]:
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of strings, not one string")
    # Deduplicated so that the sum over batches counts each distinct key
    # once, as one request's count does.
    unique = list(dict.fromkeys(keys))
    total = 0
    for batch in _batches(unique, max_batch_keys) if unique else [unique]:
        reply = yield Call("Invalidate", pb.InvalidateRequest(model=model, keys=batch))
        total += int(reply.invalidated)
    return total


def models() -> Plan[list[ModelInfo]]:
    reply = yield Call("Models", pb.ModelsRequest())
    return [
        ModelInfo(
            name=m.name,
            dim=int(m.dim),
            kind=_kind(m.kind),
            version=m.version,
            current=bool(m.current),
            stored_vectors=int(m.stored_vectors) if m.stored_vectors_counted_at_unix_ms else None,
        )
        for m in reply.models
    ]


def _kind(code: int) -> ModelKind:
    try:
        return ModelKind(code)
    except ValueError:  # a kind added after this client: not an error
        return ModelKind.MODEL_KIND_UNSPECIFIED


def import_torch() -> Any:
    """torch, imported only when a torch result is asked for: it is a large
    optional dependency that most callers of lookup() do not need."""
    try:
        return importlib.import_module("torch")
    except ImportError as e:
        raise ImportError(
            "lookup_torch() needs PyTorch, which is not installed: `pip install torch`, "
            "or call lookup(), which returns a numpy matrix"
        ) from e


def to_torch(torch: Any, matrix: npt.NDArray[np.float32], device: Any) -> Any:
    """A float32 tensor of ``matrix`` on ``device``.

    A single-batch matrix is a read-only view over the answer's bytes, and
    a torch tensor is always writable: sharing that memory would let an
    in-place op write into an immutable Python bytes object. Such a matrix
    is copied once; a multi-batch matrix (already a private, writable
    copy) is shared with the tensor without another copy.
    """
    if not matrix.flags.writeable:
        matrix = matrix.copy()
    tensor = torch.from_numpy(matrix)
    return tensor if device is None else tensor.to(device)
