#!/usr/bin/env python3
"""Convert a legacy (non-zip) PyTorch checkpoint to safetensors, with the
standard library only (no torch, no numpy).

    convert_legacy_pth.py IN.pth OUT.safetensors

The legacy format is five pickles: magic number, protocol version, system
info, the state dict (tensors refer to storages by persistent id), the list
of storage keys; then each storage's raw bytes, prefixed by its element
count (u64). Tensors may be strided views (this checkpoint stores conv
weights in a TF-like layout), so each is gathered into row-major order.
Float tensors are written as F32; integer buffers (num_batches_tracked)
are dropped.
"""
import collections
import os
import itertools
import json
import pickle
import struct
import sys
from array import array

ELEM = {"FloatStorage": ("f", 4), "LongStorage": ("q", 8), "IntStorage": ("i", 4), "DoubleStorage": ("d", 8)}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in ELEM:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in checkpoint")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        return (pid[1], pid[2])


def load(path):
    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)
        state = _Unpickler(f).load()
        keys = pickle.load(f)
        types = {}
        for storage_ref, _, _, _ in state.values():
            types[storage_ref[1]] = storage_ref[0]
        raw = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            code, size = ELEM[types.get(key, "FloatStorage")]
            data = array(code)
            data.frombytes(f.read(numel * size))
            raw[key] = data
    return state, raw


def gather(data, offset, size, stride):
    n = 1
    for s in size:
        n *= s
    contiguous = []
    acc = 1
    for s in reversed(size):
        contiguous.insert(0, acc)
        acc *= s
    if list(stride) == contiguous or n <= 1:
        return data[offset : offset + n]
    out = array(data.typecode)
    for idx in itertools.product(*(range(s) for s in size)):
        out.append(data[offset + sum(i * st for i, st in zip(idx, stride))])
    return out


def main():
    src, dst = sys.argv[1], sys.argv[2]
    state, raw = load(src)
    header, blobs, pos = {}, [], 0
    for name, (storage_ref, offset, size, stride) in state.items():
        storage_type, key = storage_ref
        if storage_type != "FloatStorage":
            continue
        values = gather(raw[key], offset, size, stride)
        blob = values.tobytes()
        header[name] = {"dtype": "F32", "shape": list(size), "data_offsets": [pos, pos + len(blob)]}
        blobs.append(blob)
        pos += len(blob)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(dst + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    os.replace(dst + ".part", dst)
    print(f"{len(blobs)} tensors, {pos} bytes -> {dst}")


if __name__ == "__main__":
    main()
