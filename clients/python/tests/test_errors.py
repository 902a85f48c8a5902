"""Typed errors, retries, deadlines and the checks of the arguments."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from conftest import MODEL, SERVER_MAX_BATCH_KEYS, Server, free_port, fresh_keys

from embark_client import (
    TLS,
    DeadlineExceeded,
    EmbArk,
    EmbArkError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


def retries_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.name == "embark_client" and "retry" in r.getMessage())


def test_an_unknown_model_is_not_found_with_the_served_models(client: EmbArk, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embark_client")
    with pytest.raises(NotFound) as e:
        client.lookup("no-such-model", ["k"])
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.method == "Lookup"
    assert "no-such-model" in e.value.message and MODEL in e.value.message
    assert isinstance(e.value, EmbArkError)
    assert retries_logged(caplog) == 0, "a final error is not retried"


def test_bad_requests_are_invalid_arguments(client: EmbArk) -> None:
    with pytest.raises(InvalidArgument, match="model is required"):
        client.lookup("", ["k"])
    with pytest.raises(InvalidArgument, match="empty"):
        client.lookup(MODEL, ["fine", ""])
    with pytest.raises(InvalidArgument, match="max-key-bytes"):
        client.lookup(MODEL, ["x" * 9000])


def test_a_batch_over_the_server_limit_is_resource_exhausted_at_once(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # RESOURCE_EXHAUSTED is retried when it means load shedding; a batch
    # over the server's limit would fail the same way every time.
    caplog.set_level(logging.INFO, logger="embark_client")
    too_many = SERVER_MAX_BATCH_KEYS + 1
    with EmbArk(server.target, max_batch_keys=too_many, retries=3, backoff=0.05) as c:
        with pytest.raises(ResourceExhausted, match="--max-batch-keys") as e:
            c.lookup(MODEL, fresh_keys(too_many))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retries_logged(caplog) == 0, "an oversized batch is not retried"


def test_nothing_listening_is_retried_then_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embark_client")
    started = time.monotonic()
    with EmbArk(f"127.0.0.1:{free_port()}", retries=3, backoff=0.05, timeout=20.0) as c:
        with pytest.raises(Unavailable) as e:
            c.models()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert retries_logged(caplog) == 3
    assert time.monotonic() - started < 10.0


def test_the_timeout_bounds_the_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embark_client")
    started = time.monotonic()
    with EmbArk(f"127.0.0.1:{free_port()}", retries=1000, backoff=0.02, max_backoff=0.1, timeout=1.0) as c:
        with pytest.raises((Unavailable, DeadlineExceeded)):
            c.models()
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, f"a 1 s timeout took {elapsed:.1f} s"
    assert retries_logged(caplog) >= 3, "it kept retrying until the deadline"


def test_a_per_call_timeout_overrides_the_default(client: EmbArk) -> None:
    with pytest.raises(DeadlineExceeded):
        client.lookup(MODEL, fresh_keys(1), timeout=1e-6)
    with pytest.raises(ValueError, match="timeout"):
        client.models(timeout=0)


@pytest.mark.parametrize(
    "target, tls, message",
    [
        ("ftp://127.0.0.1:1", None, "use host:port"),
        ("http://127.0.0.1:1", TLS(), "plaintext"),
        ("unix:///tmp/embark.sock", TLS(), "plaintext"),
        ("unix://relative.sock", None, "ABSOLUTE"),
        ("http://127.0.0.1", None, "HOST:PORT"),
    ],
)
def test_bad_targets_are_refused(target: str, tls: TLS | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbArk(target, tls=tls)


def test_bad_settings_are_refused() -> None:
    target = f"127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="max_batch_keys"):
        EmbArk(target, max_batch_keys=4097)
    with pytest.raises(ValueError, match="max_batch_keys"):
        EmbArk(target, max_batch_keys=0)
    with pytest.raises(ValueError, match="retries"):
        EmbArk(target, retries=-1)
    with pytest.raises(ValueError, match="cert and key"):
        TLS(cert=b"pem")
    with pytest.raises(ValueError, match="printable"):
        EmbArk(target, token="two words")
