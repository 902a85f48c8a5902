#!/usr/bin/env python3
"""Exports EfficientNet-Lite0 to ONNX from the same safetensors weights the
candle engine loads, as a team would export its own image encoder: input
`pixels` (N, 3, H, W) float32 (NCHW, RGB, normalised as the catalogue
entry says), output `embedding` (N, 1280), the global-average-pooled head.

Built with the `onnx` package's helpers (no PyTorch): BatchNorm folded into
each convolution in float64, ReLU6 as Clip, TensorFlow "same" padding as
auto_pad SAME_UPPER (the extra pixel at the end), as the network was
trained. scripts/setup-example-model.sh runs it; tests/tests/own_model.rs
checks the ONNX engine's vectors on it against the candle engine's.

usage: export_efficientnet_onnx.py MODEL.safetensors OUT.onnx
"""
import json
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = [  # repeats, kernel, stride, expand, in, out
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
]
EPS = 1e-3


def load_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return {k: np.frombuffer(data[m["data_offsets"][0]:m["data_offsets"][1]], dtype="<f4").reshape(m["shape"]).astype(np.float64)
            for k, m in header.items() if k != "__metadata__"}


class Graph:
    def __init__(self, p):
        self.p, self.nodes, self.inits, self.n = p, [], [], 0

    def name(self, what):
        self.n += 1
        return f"{what}_{self.n}"

    def const(self, what, array):
        name = self.name(what)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def conv_bn(self, x, conv, bn, stride=1, groups=1, relu6=True):
        """A convolution with its BatchNorm folded in, then ReLU6 if asked."""
        w = self.p[f"{conv}.weight"]
        g, b, m, v = (self.p[f"{bn}.{s}"] for s in ("weight", "bias", "running_mean", "running_var"))
        scale = g / np.sqrt(v + EPS)
        k = w.shape[-1]
        y = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("w", w * scale[:, None, None, None]), self.const("b", b - m * scale)], [y],
            kernel_shape=[k, k], strides=[stride, stride], group=groups,
            auto_pad="SAME_UPPER" if k > 1 else "NOTSET"))
        if not relu6:
            return y
        z = self.name("relu6")
        self.nodes.append(helper.make_node("Clip", [y, self.const("lo", np.array(0.0)), self.const("hi", np.array(6.0))], [z]))
        return z


def export(weights, out):
    p = load_safetensors(weights)
    g = Graph(p)
    x = g.conv_bn("pixels", "_conv_stem", "_bn0", stride=2)
    b = 0
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            s, i = (stride if r == 0 else 1), (cin if r == 0 else cout)
            inp, L = x, f"_blocks.{b}."
            if expand != 1:
                x = g.conv_bn(x, L + "_expand_conv", L + "_bn0")
            x = g.conv_bn(x, L + "_depthwise_conv", L + "_bn1", stride=s, groups=i * expand)
            x = g.conv_bn(x, L + "_project_conv", L + "_bn2", relu6=False)
            if s == 1 and i == cout:
                y = g.name("add")
                g.nodes.append(helper.make_node("Add", [x, inp], [y]))
                x = y
            b += 1
    x = g.conv_bn(x, "_conv_head", "_bn1")
    pooled = g.name("pool")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
    g.nodes.append(helper.make_node("Flatten", [pooled], ["embedding"], axis=1))
    graph = helper.make_graph(
        g.nodes, "efficientnet-lite0",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 1280])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="embark")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)


if __name__ == "__main__":
    export(*sys.argv[1:3])
