"""The Unix socket, TLS, and bearer tokens with their roles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DIM, MODEL, Server, fresh_keys

from embark_client import TLS, EmbArk, PermissionDenied, Unauthenticated, Unavailable


def test_the_unix_socket_serves_the_same_api(server: Server) -> None:
    assert server.uds is not None and server.uds.exists()
    keys = fresh_keys(2)
    with EmbArk(f"unix://{server.uds}") as local, EmbArk(server.target) as tcp:
        assert [m.name for m in local.models()] == [MODEL]
        over_uds = local.lookup(MODEL, keys)
        over_tcp = tcp.lookup(MODEL, keys)
    assert over_uds.matrix.shape == (2, DIM)
    assert np.array_equal(over_uds.matrix, over_tcp.matrix)


def token(certs: Path, name: str) -> str:
    return (certs / f"{name}.token").read_text()


def tls_client(server: Server, certs: Path, token: str | None = None) -> EmbArk:
    return EmbArk(f"https://{server.address}", tls=TLS(ca=certs / "ca.pem"), token=token, retries=0)


def test_without_a_token_the_call_is_unauthenticated(tls_server: Server, certs: Path) -> None:
    with tls_client(tls_server, certs) as c, pytest.raises(Unauthenticated):
        c.models()


def test_a_read_token_may_look_up_but_not_invalidate(tls_server: Server, certs: Path) -> None:
    with tls_client(tls_server, certs, token=token(certs, "ranker")) as c:
        assert [m.name for m in c.models()] == [MODEL]
        assert c.lookup(MODEL, fresh_keys(2)).matrix.shape == (2, DIM)
        with pytest.raises(PermissionDenied, match="(?i)needs admin"):
            c.invalidate(MODEL, ["k"])


def test_an_admin_token_may_invalidate(tls_server: Server, certs: Path) -> None:
    with tls_client(tls_server, certs, token=token(certs, "ops")) as c:
        assert c.invalidate(MODEL, ["k"]) == 1


def test_the_token_comes_from_the_environment(tls_server: Server, certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBARK_TOKEN", token(certs, "ranker"))
    with tls_client(tls_server, certs) as c:
        assert [m.name for m in c.models()] == [MODEL]


def test_server_name_overrides_the_name_checked(tls_server: Server, certs: Path) -> None:
    ca = (certs / "ca.pem").read_bytes()
    ranker = token(certs, "ranker")
    # A scheme-less target with tls= is TLS; the certificate is for "embark".
    with EmbArk(tls_server.address, tls=TLS(ca=ca, server_name="embark"), token=ranker, retries=0) as c:
        assert c.models()[0].name == MODEL
    with EmbArk(tls_server.address, tls=TLS(ca=ca, server_name="elsewhere"), token=ranker, retries=0) as c:
        with pytest.raises(Unavailable):
            c.models()


def test_a_plaintext_client_gets_no_answer_from_a_tls_server(tls_server: Server) -> None:
    with EmbArk(tls_server.target, retries=0, timeout=5.0) as c, pytest.raises(Unavailable):
        c.models()


def test_a_client_certificate_is_both_tls_and_the_principal(mtls_server: Server, certs: Path) -> None:
    mtls = TLS(ca=certs / "ca.pem", cert=certs / "scorer.pem", key=certs / "scorer.key")
    with EmbArk(f"https://{mtls_server.address}", tls=mtls, retries=0) as c:
        assert [m.name for m in c.models()] == [MODEL]
        with pytest.raises(PermissionDenied):
            c.invalidate(MODEL, ["k"])
    with EmbArk(f"https://{mtls_server.address}", tls=TLS(ca=certs / "ca.pem"), retries=0) as c:
        with pytest.raises(Unavailable):
            c.models()
