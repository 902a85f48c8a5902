"""Lookup against a live server: OOV then real rows, the zero-copy matrix,
duplicates, batching, and the options the server does not serve yet."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
from conftest import (
    DIM,
    FILL_BOUND_SECS,
    MODEL,
    SERVER_MAX_BATCH_KEYS,
    SHOES,
    Server,
    free_port,
    fresh_keys,
    wait_filled,
)

from embark_client import EmbArk, NotFound, NotSupported, Source


def test_an_unknown_key_is_oov_pending_then_comes_from_the_store(client: EmbArk) -> None:
    keys = fresh_keys(3, "a red running shoe")
    first = client.lookup(MODEL, keys)
    assert first.dim == DIM
    assert first.matrix.dtype == np.float32 and first.matrix.shape == (3, DIM)
    assert list(first.sources) == [Source.OOV_PENDING] * 3
    assert first.source_names() == ["OOV_PENDING"] * 3
    assert not first.mask.any() and first.pending.all()
    assert not first.matrix.any(), "the OOV row is zeros without --oov"

    # Each key's first real row comes from the store (where the fill loop
    # wrote it), which warms the in-process tier for the next Lookup.
    first_real: dict[str, int] = {}
    started = time.monotonic()
    while len(first_real) < len(keys):
        assert time.monotonic() - started < FILL_BOUND_SECS, f"still pending: {set(keys) - set(first_real)}"
        time.sleep(0.1)
        answer = client.lookup(MODEL, keys)
        assert not (answer.sources == Source.OOV_FAILED).any()
        for key, source, real in zip(keys, answer.sources, answer.mask):
            if real:
                first_real.setdefault(key, int(source))
    assert set(first_real.values()) == {Source.STORE}
    assert answer.mask.all() and answer.mask.dtype == np.bool_
    assert np.allclose(np.linalg.norm(answer.matrix, axis=1), 1.0, atol=1e-4), "MiniLM rows are L2-normalised"
    again = client.lookup(MODEL, keys)
    assert list(again.sources) == [Source.CACHE] * 3
    assert np.array_equal(again.matrix, answer.matrix)


def test_the_matrix_is_a_read_only_view_over_the_reply(client: EmbArk) -> None:
    result = client.lookup(MODEL, fresh_keys(4))
    matrix = result.matrix
    assert not matrix.flags.owndata and not matrix.flags.writeable
    assert matrix.flags.c_contiguous
    base: object = matrix
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes), f"the matrix should view the reply's bytes, not a {type(base)}"
    assert len(base) == matrix.nbytes
    with pytest.raises(ValueError):
        matrix[0, 0] = 1.0


def test_duplicate_keys_get_the_same_row_and_source(client: EmbArk) -> None:
    a, b = fresh_keys(2)
    keys = [a, b, a, a]
    pending = client.lookup(MODEL, keys)
    assert pending.sources[0] == pending.sources[2] == pending.sources[3]
    filled = wait_filled(client, keys)
    assert np.array_equal(filled.matrix[0], filled.matrix[2]) and np.array_equal(filled.matrix[0], filled.matrix[3])
    assert not np.array_equal(filled.matrix[0], filled.matrix[1])


def test_a_long_key_list_is_batched_into_one_contiguous_matrix(server: Server, client: EmbArk) -> None:
    keys = fresh_keys(10)
    wait_filled(client, keys)
    keys_with_duplicates = keys + keys[:3]
    one = client.lookup(MODEL, keys_with_duplicates)
    with EmbArk(server.target, max_batch_keys=3, timeout=30.0) as batched:
        many = batched.lookup(MODEL, keys_with_duplicates)
    assert many.matrix.shape == (13, DIM) and many.matrix.dtype == np.float32
    assert np.array_equal(many.matrix, one.matrix)
    assert np.array_equal(many.sources, one.sources) and np.array_equal(many.mask, one.mask)
    # The batched path copies into one array of its own.
    assert many.matrix.flags.c_contiguous and many.matrix.flags.owndata


def test_more_keys_than_the_server_allows_are_split(server: Server) -> None:
    keys = fresh_keys(SERVER_MAX_BATCH_KEYS * 2 + 5)
    with EmbArk(server.target, max_batch_keys=SERVER_MAX_BATCH_KEYS, timeout=30.0) as c:
        result = c.lookup(MODEL, keys)
    assert result.matrix.shape == (len(keys), DIM)
    assert (result.sources == Source.OOV_PENDING).all()


def test_no_keys_is_an_empty_matrix(client: EmbArk) -> None:
    result = client.lookup(MODEL, [])
    assert result.matrix.shape == (0, DIM) and len(result) == 0


def test_bad_options_are_refused_before_sending() -> None:
    # Nothing listens there: reaching the network would raise Unavailable.
    with EmbArk(f"127.0.0.1:{free_port()}", retries=0) as c:
        with pytest.raises(ValueError, match="version"):
            c.lookup(MODEL, ["k"], version="")
        with pytest.raises(ValueError, match="f16") as dtype:
            c.lookup(MODEL, ["k"], dtype="f64")
        assert not isinstance(dtype.value, NotSupported)
        with pytest.raises(TypeError, match="sequence"):
            c.lookup(MODEL, "one string")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("batch", [64, 2])
def test_every_dtype_gives_the_f32_vectors_within_its_precision(server: Server, shoes: np.ndarray, batch: int) -> None:
    # Issue 14: f16, bf16 and i8 rows on the wire, decoded to arrays; with
    # batch 2 the four keys take two requests (the concatenated matrix).
    with EmbArk(server.target, max_batch_keys=batch, timeout=30.0) as c:
        exact = c.lookup(MODEL, SHOES).matrix
        assert np.array_equal(exact, shoes)
        for dtype, kind, floor in [("f16", np.float16, 0.9999), ("bf16", np.float32, 0.999), ("i8", np.float32, 0.999)]:
            got = c.lookup(MODEL, SHOES, dtype=dtype)
            assert got.mask.all() and got.matrix.dtype == kind and got.matrix.shape == shoes.shape, dtype
            assert cosines(got.matrix, shoes).min() >= floor, (dtype, cosines(got.matrix, shoes))
        half = c.lookup(MODEL, SHOES, dtype="f16").matrix
        assert np.array_equal(half, shoes.astype(np.float16)), "f16 is f32 rounded to nearest"


def test_the_defaults_of_version_and_dtype_are_served(client: EmbArk) -> None:
    result = client.lookup(MODEL, fresh_keys(1), version=None, dtype="f32")
    assert result.matrix.shape == (1, DIM)
    (info,) = [m for m in client.models() if m.name == MODEL]
    assert info.current and result.version == info.version


def test_a_version_is_pinned_and_an_unknown_one_is_not_found(client: EmbArk) -> None:
    (info,) = [m for m in client.models() if m.name == MODEL]
    keys = fresh_keys(3)
    pinned = client.lookup(MODEL, keys, version=info.version)
    assert pinned.version == info.version and pinned.matrix.shape == (3, DIM)
    with pytest.raises(NotFound, match="no version"):
        client.lookup(MODEL, keys, version="no-such-version")
    with pytest.raises(NotFound, match="no version"):
        client.similar(MODEL, vector=np.ones(DIM, dtype=np.float32), version="no-such-version")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_lookup_torch_without_torch_says_what_to_install() -> None:
    with EmbArk(f"127.0.0.1:{free_port()}", retries=0) as c, pytest.raises(ImportError, match="pip install torch"):
        c.lookup_torch(MODEL, ["k"])
