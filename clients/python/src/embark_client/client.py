"""The blocking client."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence, TypeVar

import grpc
import numpy.typing as npt

from . import _core
from ._channel import TLS, resolve
from ._pb import embark_pb2_grpc
from .errors import DeadlineExceeded, from_rpc_error
from .results import LookupResult, ModelInfo, SimilarResult

__all__ = ["EmbArk"]

logger = logging.getLogger("embark_client")

T = TypeVar("T")


class EmbArk:
    """A client of an EmbArk server (``embark up`` / ``embark serve``).

    ``target``: ``host:port``, ``http://host:port`` (plaintext),
    ``https://host:port`` (TLS) or ``unix:///path`` (the server's ``--uds``
    socket, for a ranker on the same host). ``token``: the bearer token
    (default ``$EMBARK_TOKEN``), sent as ``authorization: Bearer <token>``.
    ``tls``: a :class:`TLS` with the CA, a client certificate or the
    server's name.

    ``timeout`` (seconds) bounds each method call, its retries and, for a
    long key list, all of its batches; every method also takes its own
    ``timeout=``. Calls answered UNAVAILABLE (server down or restarting)
    or RESOURCE_EXHAUSTED (load shed, rate limit; not a batch over the
    server's ``--max-batch-keys``, which would fail again) are retried up to
    ``retries`` times with exponential backoff (from ``backoff`` seconds,
    doubling up to ``max_backoff``) and full jitter; other errors are raised
    at once as the typed exceptions of :mod:`embark_client.errors`.

    ``max_batch_keys``: keys per Lookup/Invalidate request; longer lists are
    split. It must not exceed the server's ``--max-batch-keys`` (default
    4096), or every batch is refused.

    The client is thread-safe; use it as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: Optional[str] = None,
        tls: Optional[TLS] = None,
        timeout: float = 10.0,
        retries: int = 4,
        max_batch_keys: int = _core.DEFAULT_MAX_BATCH_KEYS,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self._settings = _core.Settings.check(timeout, retries, max_batch_keys, backoff, max_backoff)
        endpoint = resolve(target, token, tls)
        self._metadata = endpoint.metadata
        if endpoint.credentials is None:
            self._channel = grpc.insecure_channel(endpoint.address, options=endpoint.options)
        else:
            self._channel = grpc.secure_channel(endpoint.address, endpoint.credentials, options=endpoint.options)
        self._stub = embark_pb2_grpc.EmbArkStub(self._channel)

    def lookup(
        self,
        model: str,
        keys: Sequence[str],
        *,
        version: Optional[str] = None,
        dtype: str = "f32",
        timeout: Optional[float] = None,
    ) -> LookupResult:
        """The vectors of ``keys`` for ``model``, one row per key in order.

        An unknown key is not an error: its row is the model's OOV vector,
        ``mask`` is False there and its source is OOV_PENDING (queued; ask
        again later). Up to ``max_batch_keys`` keys, ``matrix`` is a
        zero-copy READ-ONLY view over the answer's bytes. Longer lists are
        sent in batches (duplicates once) and copied into one contiguous
        matrix, which owns its memory.

        ``version`` pins a model version (as :meth:`models` lists it);
        ``None`` gets the current one, and ``result.version`` says which it
        was (batches of one call are all answered from it).

        ``dtype`` is the rows' type on the wire: ``"f32"`` (default),
        ``"f16"`` (half the bytes; the matrix is float16, still a zero-copy
        view), ``"bf16"`` (half the bytes; widened to a float32 matrix, as
        numpy has no bfloat16) or ``"i8"`` (a quarter; scaled back to a
        float32 matrix by each row's scale). The cosine of each to f32 on
        real vectors is in the server's docs/vector-types.md.
        """
        plan = _core.lookup(model, keys, self._settings.max_batch_keys, version, dtype)
        return self._run(plan, timeout)

    def lookup_torch(
        self,
        model: str,
        keys: Sequence[str],
        *,
        device: Any = None,
        version: Optional[str] = None,
        dtype: str = "f32",
        timeout: Optional[float] = None,
    ) -> Any:
        """:meth:`lookup`'s matrix as a ``torch.Tensor`` of its dtype
        (float16 for ``dtype="f16"``, else float32), on ``device`` if given.
        Needs PyTorch, imported only here. The rows' sources are not part of
        a tensor: use :meth:`lookup` for the mask.

        A tensor is always writable, so a single-batch answer (a read-only
        view) is copied once; a multi-batch matrix is shared as it is.
        """
        torch = _core.import_torch()
        result = self.lookup(model, keys, version=version, dtype=dtype, timeout=timeout)
        return _core.to_torch(torch, result.matrix, device)

    def similar(
        self,
        model: str,
        key: Optional[str] = None,
        vector: Optional[npt.ArrayLike] = None,
        k: int = 10,
        min_score: float = 0.0,
        *,
        version: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> SimilarResult:
        """The stored keys of ``model`` nearest (cosine) to ``key``'s vector
        (the key itself left out) or to ``vector`` (the model's dim), best
        first, with scores of at least ``min_score``.

        ``version`` searches that model version's vectors (default: the
        current one). A ``key`` without a vector yet raises
        :class:`FailedPrecondition` (and is queued, as a Lookup would).
        """
        return self._run(_core.similar(model, key, vector, k, min_score, version), timeout)

    def invalidate(self, model: str, keys: Sequence[str], *, timeout: Optional[float] = None) -> int:
        """Forgets the vectors of ``keys`` (tier and store) and queues them
        again, e.g. after the model's output changed. Returns how many
        distinct keys were invalidated. Needs an admin token when the
        server checks tokens; rate-limited per caller by the server."""
        return self._run(_core.invalidate(model, keys, self._settings.max_batch_keys), timeout)

    def models(self, *, timeout: Optional[float] = None) -> list[ModelInfo]:
        """The models the server serves."""
        return self._run(_core.models(), timeout)

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> "EmbArk":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, plan: _core.Plan[T], timeout: Optional[float]) -> T:
        deadline = time.monotonic() + self._settings.call_timeout(timeout)
        try:
            call = next(plan)
            while True:
                call = plan.send(self._invoke(call, deadline))
        except StopIteration as done:
            result: T = done.value
            return result

    def _invoke(self, call: _core.Call, deadline: float) -> Any:
        rpc = getattr(self._stub, call.method)
        retry = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"the call's timeout ran out before attempt {retry + 1}",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    call.method,
                )
            try:
                return rpc(call.request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e, call.method)
                pause = self._settings.retry.pause(error.code, retry, deadline - time.monotonic(), error.message)
                if pause is None:
                    raise error from e
            logger.info("%s: %s; retry %d in %.3f s", call.method, error, retry + 1, pause)
            time.sleep(pause)
            retry += 1
