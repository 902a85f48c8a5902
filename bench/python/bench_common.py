"""What the Python peers of bench `retina-images` share: the reference
preprocessing (Pillow decode, antialiased bilinear resize of the shorter
side to 256, centre crop 224, (x - 127) / 128, CHW) and the timing loop
(two warm-up calls, then as many as fit in `seconds`)."""
import io
import time

import numpy as np
from PIL import Image


def preprocess(data):
    """One encoded image as a (3, 224, 224) float32 array."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    nw, nh = (256, round(h * 256 / w)) if w <= h else (round(w * 256 / h), 256)
    im = im.resize((nw, nh), Image.BILINEAR)
    l, t = (nw - 224) // 2, (nh - 224) // 2
    a = np.asarray(im.crop((l, t, l + 224, t + 224)), dtype=np.float32)
    return np.ascontiguousarray(((a - 127.0) / 128.0).transpose(2, 0, 1))


def timed(fn, seconds):
    """Items per second of `fn`, which returns how many items it did."""
    fn()  # warm-up
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += fn()
    return n / (time.perf_counter() - start)


def probe():
    """The synthetic (3, 224, 224) input the tensor runs use, as Retina's."""
    return (0.9 * np.sin(np.arange(3 * 224 * 224) * 0.0137)).astype(np.float32).reshape(3, 224, 224)
