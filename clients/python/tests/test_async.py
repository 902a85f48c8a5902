"""AsyncEmbArk: the same calls, results and errors as EmbArk, awaited."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest
from conftest import DIM, FILL_BOUND_SECS, MODEL, SHOES, Server, free_port, fresh_keys

from embark_client import AsyncEmbArk, EmbArk, NotFound, Source, Unavailable


def test_async_lookup_polls_to_real_rows_as_a_zero_copy_view(server: Server) -> None:
    keys = fresh_keys(3, "async")

    async def scenario() -> None:
        async with AsyncEmbArk(server.target, timeout=30.0) as c:
            first = await c.lookup(MODEL, keys)
            assert (first.sources == Source.OOV_PENDING).all() and not first.mask.any()
            started = time.monotonic()
            result = first
            while not result.mask.all():
                assert time.monotonic() - started < FILL_BOUND_SECS, "keys still pending"
                await asyncio.sleep(0.1)
                result = await c.lookup(MODEL, keys)
            assert result.matrix.shape == (3, DIM) and result.matrix.dtype == np.float32
            assert not result.matrix.flags.owndata and not result.matrix.flags.writeable
            with EmbArk(server.target) as sync:
                assert np.array_equal(sync.lookup(MODEL, keys).matrix, result.matrix)

    asyncio.run(scenario())


def test_async_batches_similar_invalidate_and_models(server: Server, shoes: np.ndarray) -> None:
    keys = fresh_keys(5, "async batch")

    async def scenario() -> None:
        async with AsyncEmbArk(server.target, max_batch_keys=2, timeout=30.0) as c:
            batched = await c.lookup(MODEL, keys + keys[:1])
            assert batched.matrix.shape == (6, DIM) and batched.matrix.flags.owndata
            assert np.array_equal(batched.matrix[0], batched.matrix[5])
            assert [m.name for m in await c.models()] == [MODEL]
            similar = await c.similar(MODEL, vector=shoes[0], k=1)
            assert [key for key, _ in similar] == [SHOES[0]] and similar[0].score == pytest.approx(1.0, abs=1e-4)
            assert await c.invalidate(MODEL, keys + keys) == 5
            with pytest.raises(NotFound):
                await c.lookup("no-such-model", ["k"])
            quantized = await c.lookup(MODEL, SHOES[:1], dtype="i8")
            assert quantized.matrix.dtype == np.float32 and quantized.matrix.shape == (1, DIM)

    asyncio.run(scenario())


def test_async_retries_then_raises_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embark_client")

    async def scenario() -> None:
        async with AsyncEmbArk(f"127.0.0.1:{free_port()}", retries=2, backoff=0.05) as c:
            with pytest.raises(Unavailable):
                await c.models()

    started = time.monotonic()
    asyncio.run(scenario())
    assert sum(1 for r in caplog.records if r.name == "embark_client" and "retry" in r.getMessage()) == 2
    assert time.monotonic() - started < 10.0
