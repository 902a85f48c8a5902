#!/usr/bin/env python3
"""Look up embeddings from EmbArk and wrap them as a numpy matrix.

    examples/python/setup.sh            # once: venv with grpcio + numpy, stubs
    ~/.cache/embark/venv-client/bin/python examples/python/lookup.py "a red shoe" "a blue shoe"

Against a server with TLS and tokens (docs/security.md), e.g. the compose
deployment, with its CA and a token copied out of the `certs` volume:

    lookup.py --target "$(docker compose port embark 50051)" --ca ca.pem \\
        --token-file ranker.token "a red shoe"

--ca turns TLS on (the server's certificate must be valid for the host of
--target and signed by that CA); --cert/--key add a client certificate
(mTLS). The token (--token, --token-file or $EMBARK_TOKEN) is sent as
`authorization: Bearer <token>` metadata. With none of these, the channel is
plaintext, as `embark up` serves by default.
"""
import argparse
import os
import sys

import grpc
import numpy as np

# Stubs generated from proto/proto by setup.sh.
sys.path.insert(0, os.environ.get("EMBARK_PY_STUBS", os.path.expanduser("~/.cache/embark/py-stubs")))
from embark.v1 import embark_pb2, embark_pb2_grpc  # noqa: E402

OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def channel(target, ca=None, cert=None, key=None):
    """A plaintext channel, or TLS when a CA or a client certificate is given."""
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together (the client certificate and its key)")
    if ca is None and cert is None:
        return grpc.insecure_channel(target, options=OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca) if ca else None,  # None: the system's roots
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    return grpc.secure_channel(target, credentials, options=OPTIONS)


def lookup(target, model, keys, ca=None, cert=None, key=None, token=None):
    stub = embark_pb2_grpc.EmbArkStub(channel(target, ca, cert, key))
    metadata = [("authorization", f"Bearer {token}")] if token else None
    reply = stub.Lookup(embark_pb2.LookupRequest(model=model, keys=keys), timeout=5, metadata=metadata)
    # One contiguous little-endian float32 matrix: no copy, no parsing.
    matrix = np.frombuffer(reply.vectors, dtype="<f4").reshape(len(keys), reply.dim)
    sources = np.array(reply.sources)
    real = np.isin(sources, [embark_pb2.CACHE, embark_pb2.STORE])  # False = OOV row
    return matrix, real, [embark_pb2.Source.Name(s) for s in reply.sources]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("keys", nargs="+")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--model", default="minilm-l6-v2")
    p.add_argument("--ca", metavar="PATH", help="PEM CA that signed the server's certificate; turns TLS on")
    p.add_argument("--cert", metavar="PATH", help="PEM client certificate (mTLS); needs --key")
    p.add_argument("--key", metavar="PATH", help="PEM key of --cert")
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="bearer token (default: $EMBARK_TOKEN); visible in `ps`, prefer the others")
    tokens.add_argument("--token-file", metavar="PATH", help="file holding the bearer token")
    a = p.parse_args()
    if (a.cert is None) != (a.key is None):
        p.error("--cert and --key go together")
    token = a.token
    if a.token_file:
        token = read(a.token_file).decode().strip()
    elif token is None:
        token = os.environ.get("EMBARK_TOKEN") or None
    tls = a.ca is not None or a.cert is not None
    if token and not tls:
        print("warning: sending the token over a plaintext channel (give --ca for TLS)", file=sys.stderr)
    try:
        matrix, real, names = lookup(a.target, a.model, a.keys, a.ca, a.cert, a.key, token)
    except grpc.RpcError as e:
        hint = {
            grpc.StatusCode.UNAUTHENTICATED: " (no token, or one the server does not know: --token, $EMBARK_TOKEN)",
            grpc.StatusCode.PERMISSION_DENIED: " (the token's role does not allow this call)",
        }.get(e.code(), "")
        sys.exit(f"Lookup failed: {e.code().name}: {e.details()}{hint}")
    print(f"matrix {matrix.shape} {matrix.dtype}, real rows: {int(real.sum())}/{len(real)}")
    for key, name, row in zip(a.keys, names, matrix):
        print(f"{name:12} |v|={np.linalg.norm(row):.4f} {key}")


if __name__ == "__main__":
    main()
