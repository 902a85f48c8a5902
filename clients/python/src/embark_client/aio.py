"""The asyncio client (grpc.aio): the same methods as :class:`EmbArk`,
as coroutines."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional, Sequence, TypeVar

import grpc
import grpc.aio
import numpy.typing as npt

from . import _core
from ._channel import TLS, resolve
from ._pb import embark_pb2_grpc
from .errors import DeadlineExceeded, from_rpc_error
from .results import LookupResult, ModelInfo, SimilarResult

__all__ = ["AsyncEmbArk"]

logger = logging.getLogger("embark_client")

T = TypeVar("T")


class AsyncEmbArk:
    """The asyncio twin of :class:`embark_client.EmbArk`: same arguments,
    same methods (awaited), same results, retries and exceptions.

    grpc.aio binds a channel to the event loop it is first used on: create
    and use the client within one loop, and close it there
    (``async with AsyncEmbArk(...) as client:`` or ``await client.close()``).
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
            self._channel = grpc.aio.insecure_channel(endpoint.address, options=endpoint.options)
        else:
            self._channel = grpc.aio.secure_channel(endpoint.address, endpoint.credentials, options=endpoint.options)
        self._stub = embark_pb2_grpc.EmbArkStub(self._channel)

    async def lookup(
        self,
        model: str,
        keys: Sequence[str],
        *,
        version: Optional[str] = None,
        dtype: str = "f32",
        timeout: Optional[float] = None,
    ) -> LookupResult:
        """See :meth:`embark_client.EmbArk.lookup` (zero-copy read-only
        matrix up to ``max_batch_keys`` keys, one contiguous copy above)."""
        plan = _core.lookup(model, keys, self._settings.max_batch_keys, version, dtype)
        return await self._run(plan, timeout)

    async def lookup_torch(
        self,
        model: str,
        keys: Sequence[str],
        *,
        device: Any = None,
        version: Optional[str] = None,
        dtype: str = "f32",
        timeout: Optional[float] = None,
    ) -> Any:
        """See :meth:`embark_client.EmbArk.lookup_torch`."""
        torch = _core.import_torch()
        result = await self.lookup(model, keys, version=version, dtype=dtype, timeout=timeout)
        return _core.to_torch(torch, result.matrix, device)

    async def similar(
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
        """See :meth:`embark_client.EmbArk.similar`."""
        return await self._run(_core.similar(model, key, vector, k, min_score, version), timeout)

    async def invalidate(self, model: str, keys: Sequence[str], *, timeout: Optional[float] = None) -> int:
        """See :meth:`embark_client.EmbArk.invalidate`."""
        return await self._run(_core.invalidate(model, keys, self._settings.max_batch_keys), timeout)

    async def models(self, *, timeout: Optional[float] = None) -> list[ModelInfo]:
        """See :meth:`embark_client.EmbArk.models`."""
        return await self._run(_core.models(), timeout)

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> "AsyncEmbArk":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, plan: _core.Plan[T], timeout: Optional[float]) -> T:
        deadline = time.monotonic() + self._settings.call_timeout(timeout)
        try:
            call = next(plan)
            while True:
                call = plan.send(await self._invoke(call, deadline))
        except StopIteration as done:
            result: T = done.value
            return result

    async def _invoke(self, call: _core.Call, deadline: float) -> Any:
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
                return await rpc(call.request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e, call.method)
                pause = self._settings.retry.pause(error.code, retry, deadline - time.monotonic(), error.message)
                if pause is None:
                    raise error from e
            logger.info("%s: %s; retry %d in %.3f s", call.method, error, retry + 1, pause)
            await asyncio.sleep(pause)
            retry += 1
