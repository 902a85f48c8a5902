"""Targets, TLS and the bearer token: turning the constructor's arguments
into what grpcio needs, checked once, for the sync and async clients alike."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import grpc

__all__ = ["TLS", "Endpoint", "resolve"]

logger = logging.getLogger("embark_client")

#: A path to a PEM file, or the PEM bytes themselves.
PemSource = Union[str, "os.PathLike[str]", bytes]

# The largest answer accepted: a full 4096-key batch of a 4096-d model is
# 64 MiB; grpcio's default (4 MiB) would refuse a 256-key batch of a
# 1280-d model with a little headroom only.
_MAX_RECEIVE_BYTES = 256 << 20

_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
    # Big answers arrive in fewer HTTP/2 frames; with tonic servers this
    # was the largest single throughput gain measured (DESIGN.md, "gRPC
    # transport").
    ("grpc.http2.max_frame_size", 1 << 20),
    # While a server restarts, grpcio would otherwise wait up to its
    # default 1 s (then growing to 120 s) before reconnecting, failing
    # every retry fast in between; keep reconnects in step with the
    # client's own backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


@dataclass(frozen=True)
class TLS:
    """TLS settings for an ``https://`` (or scheme-less) target.

    ``ca``: the PEM CA that signed the server's certificate (default: the
    system's roots). ``cert``/``key``: a client certificate and its key, for
    a server started with ``--tls-client-ca`` (mTLS); they go together.
    ``server_name``: the name the server's certificate must carry, when it
    differs from the target's host (e.g. the target is an IP address or a
    load balancer). Each of ``ca``, ``cert``, ``key`` is a path or PEM bytes.
    """

    ca: Optional[PemSource] = None
    cert: Optional[PemSource] = None
    key: Optional[PemSource] = None
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: cert and key go together (the client certificate and its private key)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca), private_key=_pem(self.key), certificate_chain=_pem(self.cert)
        )


def _pem(source: Optional[PemSource]) -> Optional[bytes]:
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class Endpoint:
    """A resolved target: the address grpcio dials, its credentials (None:
    plaintext), channel options, and the metadata sent with every call."""

    address: str
    credentials: Optional[grpc.ChannelCredentials]
    options: tuple[tuple[str, Union[int, str]], ...]
    metadata: tuple[tuple[str, str], ...]


def resolve(target: str, token: Optional[str], tls: Optional[TLS]) -> Endpoint:
    """Checks and translates ``target``, ``token`` and ``tls``.

    ``host:port`` is plaintext unless ``tls`` is given; ``http://`` is
    plaintext; ``https://`` is TLS (system roots unless ``tls`` says
    otherwise); ``unix:///path`` is the server's ``--uds`` socket, which is
    always plaintext (file permissions guard it). The token defaults to
    ``$EMBARK_TOKEN``.
    """
    if token is None:
        token = os.environ.get("EMBARK_TOKEN") or None
    token = token.strip() if token else None
    metadata: tuple[tuple[str, str], ...] = ()
    if token:
        if any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
            raise ValueError("the token must be printable ASCII without spaces (it is sent as gRPC metadata)")
        metadata = (("authorization", f"Bearer {token}"),)

    scheme, sep, rest = target.partition("://")
    if not sep:
        scheme, rest = ("https" if tls is not None else "http"), target
    options: list[tuple[str, Union[int, str]]] = list(_OPTIONS)
    if scheme == "unix":
        if tls is not None:
            raise ValueError(f"{target}: the --uds socket is plaintext; drop tls= (file permissions guard it)")
        if not rest.startswith("/"):
            raise ValueError(f"{target}: a Unix socket target is unix:///ABSOLUTE/PATH")
        # grpcio would send the socket's path as the :authority, which is
        # not a valid HTTP authority: the server's HTTP/2 stack resets the
        # stream (PROTOCOL_ERROR).
        options.append(("grpc.default_authority", "localhost"))
        return Endpoint(target, None, tuple(options), metadata)
    if scheme not in ("http", "https"):
        raise ValueError(f"target {target!r}: use host:port, http://host:port, https://host:port or unix:///path")
    address = rest.rstrip("/")
    if not address or "/" in address or ":" not in address:
        raise ValueError(f"target {target!r}: expected {scheme}://HOST:PORT")
    if scheme == "http":
        if tls is not None:
            raise ValueError(f"target {target!r} is plaintext (http://) but tls= is given: use https://")
        if token:
            logger.warning("sending the bearer token over a plaintext channel to %s (use https:// and tls=)", address)
        return Endpoint(address, None, tuple(options), metadata)
    tls = tls if tls is not None else TLS()
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return Endpoint(address, tls.credentials(), tuple(options), metadata)
