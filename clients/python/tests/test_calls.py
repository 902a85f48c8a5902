"""Similar, Invalidate and Models against a live server."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DIM, MODEL, SHOES, Server, fresh_keys, wait_filled

from embark_client import EmbArk, FailedPrecondition, ModelInfo, ModelKind, Neighbour, Source


def test_similar_by_key_finds_the_near_duplicate_first(client: EmbArk, shoes: np.ndarray) -> None:
    result = client.similar(MODEL, key=SHOES[0], k=3, min_score=-1.0)
    keys = [n.key for n in result]
    assert SHOES[0] not in keys, "the query key is left out"
    assert keys[0] == SHOES[1]
    scores = [score for _, score in result]
    assert scores == sorted(scores, reverse=True) and len(result) == 3
    assert isinstance(result[0], Neighbour) and isinstance(result[0].score, float)
    assert result.exact, "a handful of vectors is searched exactly"
    expected = float(shoes[0] @ shoes[1])
    assert result[0].score == pytest.approx(expected, abs=1e-4)


def test_similar_by_vector_includes_the_key_itself(client: EmbArk, shoes: np.ndarray) -> None:
    result = client.similar(MODEL, vector=shoes[2], k=2)
    assert result[0].key == SHOES[2] and result[0].score == pytest.approx(1.0, abs=1e-4)


def test_similar_honours_min_score(client: EmbArk, shoes: np.ndarray) -> None:
    result = client.similar(MODEL, key=SHOES[0], k=10, min_score=0.99)
    assert len(result) == 0 or all(score >= 0.99 for _, score in result)
    assert SHOES[3] not in [key for key, _ in result]


def test_similar_of_a_key_without_a_vector_is_a_failed_precondition(client: EmbArk) -> None:
    with pytest.raises(FailedPrecondition):
        client.similar(MODEL, key=fresh_keys(1)[0])


def test_similar_needs_exactly_one_query(client: EmbArk) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.similar(MODEL)
    with pytest.raises(ValueError, match="exactly one"):
        client.similar(MODEL, key="a", vector=np.zeros(DIM, np.float32))
    with pytest.raises(ValueError, match="1-d"):
        client.similar(MODEL, vector=np.zeros((2, DIM), np.float32))


def test_invalidate_forgets_and_requeues_distinct_keys(server: Server, client: EmbArk) -> None:
    keys = fresh_keys(5, "invalidated")
    wait_filled(client, keys)
    # Batched (2 per request) and with duplicates: still the distinct count.
    with EmbArk(server.target, max_batch_keys=2, timeout=30.0) as c:
        assert c.invalidate(MODEL, keys + keys[:2]) == 5
    after = client.lookup(MODEL, keys)
    assert Source.CACHE not in set(after.sources), "the tier forgot them"
    again = wait_filled(client, keys)
    assert again.mask.all()


def test_invalidate_counts_a_key_never_seen(client: EmbArk) -> None:
    assert client.invalidate(MODEL, fresh_keys(1)) == 1


def test_models_lists_the_served_model(client: EmbArk) -> None:
    models = client.models()
    assert len(models) == 1
    model = models[0]
    assert isinstance(model, ModelInfo)
    assert (model.name, model.dim, model.kind) == (MODEL, DIM, ModelKind.TEXT)
    assert model.version
