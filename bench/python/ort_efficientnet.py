#!/usr/bin/env python3
"""EfficientNet-Lite0 exported to ONNX (scripts/export_efficientnet_onnx.py),
on onnxruntime from Python, timed the way bench `retina-images` times
Retina: images/s on preprocessed tensors and end to end from JPEG (Pillow
decode and resize, as the reference preprocessing). onnxruntime runs as its
users tune it for CPU inference: every graph optimisation
(ORT_ENABLE_ALL), `--threads` intra-op threads, sequential execution.
Prints one JSON object: {"tensor": {batch: images_per_s}, "jpeg": {...},
"onnxruntime": version, "threads": n}.

    ort_efficientnet.py MODEL.onnx JPEG... --batches 1,16 --seconds 5 --threads 2
"""
import argparse
import json

import numpy as np
import onnxruntime as ort

from bench_common import preprocess, probe, timed


def main():
    a = argparse.ArgumentParser()
    a.add_argument("model")
    a.add_argument("jpegs", nargs="+")
    a.add_argument("--batches", default="1,8,16,32")
    a.add_argument("--seconds", type=float, default=5.0)
    a.add_argument("--threads", type=int, default=2)
    args = a.parse_args()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    jpegs = [open(p, "rb").read() for p in args.jpegs]
    out = {"onnxruntime": ort.__version__, "threads": args.threads, "tensor": {}, "jpeg": {}}
    x = probe()
    for b in [int(v) for v in args.batches.split(",")]:
        batch = np.ascontiguousarray(np.repeat(x[None], b, axis=0))
        out["tensor"][b] = timed(lambda: (session.run(None, {name: batch}), b)[1], args.seconds)

        def e2e():
            t = np.stack([preprocess(jpegs[i % len(jpegs)]) for i in range(b)])
            session.run(None, {name: t})
            return b

        out["jpeg"][b] = timed(e2e, args.seconds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
