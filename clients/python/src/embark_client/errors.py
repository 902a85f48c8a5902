"""Typed exceptions: one class per gRPC status the server uses.

A ranker usually wants to treat "my request is wrong" (fix the code),
"not allowed" (fix the deployment) and "try later" (degrade gracefully)
differently; catching a class says which without comparing status codes.
Every exception derives from :class:`EmbArkError`, so ``except EmbArkError``
catches all of them.
"""

from __future__ import annotations

from typing import Optional

import grpc

__all__ = [
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
    "from_rpc_error",
]


class EmbArkError(Exception):
    """Base of every error this client raises.

    ``code`` is the gRPC status code (``None`` for an error found on the
    client side, e.g. :class:`NotSupported`), ``message`` the server's own
    text, which names the limit or flag to change, and ``method`` the RPC
    that failed (``"Lookup"``...).
    """

    code: Optional[grpc.StatusCode]
    message: str
    method: Optional[str]

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None, method: Optional[str] = None) -> None:
        self.code = code
        self.message = message
        self.method = method
        where = f"{method}: " if method else ""
        status = f"{code.name}: " if code is not None else ""
        super().__init__(f"{where}{status}{message}")


class InvalidArgument(EmbArkError):
    """The request is malformed: no model, an empty key, a key over
    ``--max-key-bytes``, no query for Similar..."""


class NotFound(EmbArkError):
    """The model is not served; the message lists the models that are."""


class FailedPrecondition(EmbArkError):
    """Similar was asked for a key that has no vector yet (it is queued now:
    ask again once a Lookup answers it from CACHE or STORE)."""


class Unauthenticated(EmbArkError):
    """No token, or one the server does not know (``token=`` or
    ``$EMBARK_TOKEN``)."""


class PermissionDenied(EmbArkError):
    """The token's role does not allow the call (Invalidate needs admin)."""


class Unavailable(EmbArkError):
    """The server could not be reached, or the store could not be written.
    Retried with backoff before it is raised."""


class ResourceExhausted(EmbArkError):
    """The server shed load, the Invalidate rate limit was hit, or a batch
    was over the server's ``--max-batch-keys``. Retried with backoff before
    it is raised (the last case cannot succeed: lower ``max_batch_keys``)."""


class DeadlineExceeded(EmbArkError):
    """The call, retries included, did not finish within its timeout."""


class NotSupported(EmbArkError, NotImplementedError):
    """An option the client accepts for a stable signature but the server
    cannot honour. Raised before anything is sent. (No option is refused
    this way today: model versions and the f16, bf16 and i8 dtypes are
    served; the class stays for callers that catch it.)"""


class ProtocolError(EmbArkError):
    """The server's answer does not have the shape the contract promises
    (e.g. fewer rows than keys): a client/server version mismatch."""


_BY_CODE: dict[grpc.StatusCode, type[EmbArkError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(error: grpc.RpcError, method: str) -> EmbArkError:
    """The typed exception for a failed call (``EmbArkError`` itself for a
    code without a class of its own, e.g. INTERNAL)."""
    # Both grpc.Call (sync) and grpc.aio.AioRpcError have code()/details().
    code: grpc.StatusCode = error.code()
    details: Optional[str] = error.details()
    return _BY_CODE.get(code, EmbArkError)(details or "", code, method)
