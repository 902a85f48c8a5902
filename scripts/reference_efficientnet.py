#!/usr/bin/env python3
"""Independent reference for `efficientnet-lite0`: the network in numpy
(float64, BatchNorm unfused, TensorFlow "same" padding computed per conv)
and Pillow preprocessing, as DESIGN.md specifies. Shares no code with the
Rust side. Run through scripts/reference-vectors.sh; writes
tests/fixtures/efficientnet_reference.json with:

- `synthetic`: the pooled vector of a fixed input tensor both sides build
  from a formula (the network alone, on identical input);
- `images`: the pooled vector of each fixture image, end to end from the
  encoded file (decoding and resizing included);
- `cat_top5`: the ImageNet classes the classifier head ranks first for
  cat.jpg (281-285 are the cat classes).
"""
import json
import math
import os
import struct
import sys

import numpy as np
from PIL import Image

STAGES = [  # repeats, kernel, stride, expand, in, out
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
]
EPS = 1e-3
IMAGES = ["cat.jpg", "coffee.webp", "astronaut.png", "camera_gray.png", "logo_alpha.png", "rocket.bmp",
          "animated.gif", "camera_16bit.png"]


def load_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return {k: np.frombuffer(data[m["data_offsets"][0]:m["data_offsets"][1]], dtype="<f4").reshape(m["shape"]).astype(np.float64)
            for k, m in header.items() if k != "__metadata__"}


def same_pad(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv(x, w, stride, groups=1):
    """x: (C, H, W); w: (O, C/groups, k, k); TF 'same' padding."""
    c, h, wd = x.shape
    o, cg, k, _ = w.shape
    (pt, pb), (pl, pr) = same_pad(h, k, stride), same_pad(wd, k, stride)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr)))
    oh, ow = -(-h // stride), -(-wd // stride)
    if groups == 1:
        cols = np.stack([xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride] for i in range(k) for j in range(k)], 1)
        return np.einsum("ock,ckhw->ohw", w.reshape(o, cg, k * k), cols)
    out = np.zeros((o, oh, ow))
    for i in range(k):
        for j in range(k):
            out += w[:, 0, i, j][:, None, None] * xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return out


def bn(x, p, name):
    g, b, m, v = (p[f"{name}.{s}"] for s in ("weight", "bias", "running_mean", "running_var"))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + EPS) * g[:, None, None] + b[:, None, None]


relu6 = lambda x: np.clip(x, 0, 6)  # noqa: E731


def forward(x, p):
    x = relu6(bn(conv(x, p["_conv_stem.weight"], 2), p, "_bn0"))
    b = 0
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            s, i = (stride if r == 0 else 1), (cin if r == 0 else cout)
            inp, L = x, f"_blocks.{b}."
            if expand != 1:
                x = relu6(bn(conv(x, p[L + "_expand_conv.weight"], 1), p, L + "_bn0"))
            x = relu6(bn(conv(x, p[L + "_depthwise_conv.weight"], s, groups=x.shape[0]), p, L + "_bn1"))
            x = bn(conv(x, p[L + "_project_conv.weight"], 1), p, L + "_bn2")
            if s == 1 and i == cout:
                x = x + inp
            b += 1
    x = relu6(bn(conv(x, p["_conv_head.weight"], 1), p, "_bn1"))
    pooled = x.mean((1, 2))
    return pooled, p["_fc.weight"] @ pooled + p["_fc.bias"]


def preprocess(path):
    im = Image.open(path)
    im.seek(0)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    nw, nh = (256, int(round(h * 256 / w))) if w <= h else (int(round(w * 256 / h)), 256)
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - 224) // 2, (nh - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    return (np.asarray(im, dtype=np.float64).transpose(2, 0, 1) - 127.0) / 128.0


def synthetic():
    i = np.arange(3 * 224 * 224, dtype=np.float64)
    return (0.9 * np.sin(i * 0.0137)).reshape(3, 224, 224)


def main():
    models = os.environ.get("EMBARK_MODELS_DIR", os.path.expanduser("~/.cache/embark/models"))
    p = load_safetensors(os.path.join(models, "efficientnet-lite0", "model.safetensors"))
    fixtures = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    r = lambda v: [round(float(x), 6) for x in v]  # noqa: E731
    out = {"model": "efficientnet-lite0", "made_by": "scripts/reference_efficientnet.py (numpy float64, Pillow)"}
    pooled, _ = forward(synthetic(), p)
    out["synthetic"] = {"formula": "x[i] = 0.9 * sin(0.0137 * i), i over (3, 224, 224) in CHW order", "vector": r(pooled)}
    out["images"] = []
    for name in IMAGES:
        pooled, logits = forward(preprocess(os.path.join(fixtures, "images", name)), p)
        out["images"].append({"file": name, "vector": r(pooled), "top5": [int(c) for c in np.argsort(-logits)[:5]]})
        print(f"{name:18} top5 {out['images'][-1]['top5']}", file=sys.stderr)
    with open(os.path.join(fixtures, "efficientnet_reference.json"), "w") as f:
        json.dump(out, f)
        f.write("\n")


if __name__ == "__main__":
    main()
