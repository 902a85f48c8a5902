#!/usr/bin/env python3
"""Look up embeddings from EmbArk and wrap them as a numpy matrix.

    examples/python/setup.sh            # once: venv with grpcio + numpy, stubs
    ~/.cache/embark/venv-client/bin/python examples/python/lookup.py "a red shoe" "a blue shoe"
"""
import argparse
import os
import sys

import grpc
import numpy as np

# Stubs generated from proto/proto by setup.sh.
sys.path.insert(0, os.environ.get("EMBARK_PY_STUBS", os.path.expanduser("~/.cache/embark/py-stubs")))
from embark.v1 import embark_pb2, embark_pb2_grpc  # noqa: E402


def lookup(target, model, keys):
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 256 << 20)])
    stub = embark_pb2_grpc.EmbArkStub(channel)
    reply = stub.Lookup(embark_pb2.LookupRequest(model=model, keys=keys), timeout=5)
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
    a = p.parse_args()
    matrix, real, names = lookup(a.target, a.model, a.keys)
    print(f"matrix {matrix.shape} {matrix.dtype}, real rows: {int(real.sum())}/{len(real)}")
    for key, name, row in zip(a.keys, names, matrix):
        print(f"{name:12} |v|={np.linalg.norm(row):.4f} {key}")


if __name__ == "__main__":
    main()
