#!/usr/bin/env python3
"""EfficientNet-Lite0 in PyTorch on CPU, on the same converted weights,
timed the way bench `retina-images` times Retina. PyTorch runs in the
configurations its users tune it to, and each batch size reports the
fastest: eager under inference mode, and BatchNorm folded into the
convolutions (torch.nn.utils.fusion.fuse_conv_bn_eval) with channels_last
tensors under inference mode. Prints one JSON object: {"tensor": {batch:
images_per_s}, "jpeg": {...}, "config": {batch: name}, "configs": {name:
{"tensor": {...}}}, "torch": version, "threads": n}.

    torch_efficientnet.py MODEL.safetensors JPEG... --batches 1,8,16,32 --seconds 5 --threads 2
"""
import argparse
import json
import struct

import numpy as np
import torch
import torch.nn.functional as F

from bench_common import preprocess, probe, timed

STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def load(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return {k: torch.from_numpy(np.frombuffer(data[m["data_offsets"][0]:m["data_offsets"][1]], dtype="<f4")
                                .reshape(m["shape"]).copy()) for k, m in header.items() if k != "__metadata__"}


class Conv(torch.nn.Module):
    """Conv + BatchNorm (eval) with TF 'same' padding, optional ReLU6."""

    def __init__(self, w, p, bn, stride, groups=1, act=True):
        super().__init__()
        o, _, k, _ = w.shape
        self.conv = torch.nn.Conv2d(w.shape[1] * groups, o, k, stride, 0, groups=groups, bias=False)
        self.conv.weight.data = w
        self.bn = torch.nn.BatchNorm2d(o, eps=1e-3)
        for s in ("weight", "bias", "running_mean", "running_var"):
            getattr(self.bn, s).data = p[f"{bn}.{s}"]
        self.k, self.s, self.act = k, stride, act

    def fold(self):
        """BatchNorm folded into the convolution (inference only)."""
        self.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(self.conv, self.bn)
        self.bn = torch.nn.Identity()

    def forward(self, x):
        h, w = x.shape[-2:]
        ph = max((-(-h // self.s) - 1) * self.s + self.k - h, 0)
        pw = max((-(-w // self.s) - 1) * self.s + self.k - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class Block(torch.nn.Module):
    def __init__(self, p, b, k, s, e, i, o):
        super().__init__()
        L = f"_blocks.{b}."
        self.expand = Conv(p[L + "_expand_conv.weight"], p, L + "_bn0", 1) if e != 1 else None
        mid = i * e
        self.dw = Conv(p[L + "_depthwise_conv.weight"], p, L + "_bn1", s, groups=mid)
        self.project = Conv(p[L + "_project_conv.weight"], p, L + "_bn2", 1, act=False)
        self.residual = s == 1 and i == o

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return y + x if self.residual else y


class Lite0(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.stem = Conv(p["_conv_stem.weight"], p, "_bn0", 2)
        blocks, b = [], 0
        for r, k, s, e, i, o in STAGES:
            for j in range(r):
                blocks.append(Block(p, b, k, s if j == 0 else 1, e, i if j == 0 else o, o))
                b += 1
        self.blocks = torch.nn.Sequential(*blocks)
        self.head = Conv(p["_conv_head.weight"], p, "_bn1", 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x))).mean((2, 3))


def main():
    a = argparse.ArgumentParser()
    a.add_argument("weights")
    a.add_argument("jpegs", nargs="+")
    a.add_argument("--batches", default="1,8,16,32")
    a.add_argument("--seconds", type=float, default=5.0)
    a.add_argument("--threads", type=int, default=2)
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    weights = load(args.weights)
    eager = Lite0(weights).eval()
    folded = Lite0(weights).eval()
    for m in folded.modules():
        if isinstance(m, Conv):
            m.fold()
    folded = folded.to(memory_format=torch.channels_last)
    configs = {
        "eager": (eager, torch.contiguous_format),
        "folded+channels_last": (folded, torch.channels_last),
    }
    jpegs = [open(p, "rb").read() for p in args.jpegs]
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tensor": {}, "jpeg": {}, "config": {},
           "configs": {name: {"tensor": {}} for name in configs}}
    x = torch.from_numpy(probe())
    with torch.inference_mode():
        for b in [int(v) for v in args.batches.split(",")]:
            for name, (model, layout) in configs.items():
                batch = x.unsqueeze(0).repeat(b, 1, 1, 1).contiguous(memory_format=layout)
                out["configs"][name]["tensor"][b] = timed(lambda: (model(batch), b)[1], args.seconds)
            best = max(configs, key=lambda n: out["configs"][n]["tensor"][b])
            model, layout = configs[best]
            out["config"][b] = best
            out["tensor"][b] = out["configs"][best]["tensor"][b]

            def e2e():
                t = torch.from_numpy(np.stack([preprocess(jpegs[i % len(jpegs)]) for i in range(b)]))
                model(t.contiguous(memory_format=layout))
                return b

            out["jpeg"][b] = timed(e2e, args.seconds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
