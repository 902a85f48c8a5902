#!/usr/bin/env python3
"""Make the image fixtures in tests/fixtures/images/ from the sample photos
shipped in scikit-image's wheel (public domain / CC0, see that folder's
README). Needs Pillow; run through scripts/reference-vectors.sh.

One file per case the decoder must handle: JPEG, PNG, GIF (animated: first
frame), WebP (lossy), BMP; grayscale, alpha and 16-bit; landscape,
portrait, square, smaller than the 256 px the model resizes to.
"""
import glob
import io
import os
import subprocess
import sys
import tempfile
import zipfile

from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "images")


def skimage_wheel():
    cache = os.path.join(os.environ.get("EMBARK_CACHE", os.path.expanduser("~/.cache/embark")), "wheels")
    found = glob.glob(os.path.join(cache, "scikit_image-0.25.2-*.whl"))
    if not found:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--dest", cache, "scikit-image==0.25.2"])
        found = glob.glob(os.path.join(cache, "scikit_image-0.25.2-*.whl"))
    return zipfile.ZipFile(found[0])


def main():
    os.makedirs(OUT, exist_ok=True)
    z = skimage_wheel()
    img = lambda name: Image.open(io.BytesIO(z.read("skimage/data/" + name)))  # noqa: E731

    img("chelsea.png").convert("RGB").save(os.path.join(OUT, "cat.jpg"), quality=92)
    img("coffee.png").convert("RGB").save(os.path.join(OUT, "coffee.webp"), quality=90)
    img("astronaut.png").convert("RGB").resize((320, 320), Image.LANCZOS).save(os.path.join(OUT, "astronaut.png"))
    img("camera.png").convert("L").resize((300, 300), Image.LANCZOS).save(os.path.join(OUT, "camera_gray.png"))
    logo = img("logo.png").convert("RGBA")
    logo.resize((logo.width // 2, logo.height // 2), Image.LANCZOS).save(os.path.join(OUT, "logo_alpha.png"))
    img("rocket.jpg").convert("RGB").resize((200, 300), Image.LANCZOS).save(os.path.join(OUT, "rocket.bmp"))
    with open(os.path.join(OUT, "animated.gif"), "wb") as f:
        f.write(z.read("skimage/data/no_time_for_that_tiny.gif"))
    # 16-bit grayscale: 8-bit values scaled by 257, so 1/257 recovers them.
    gray = img("camera.png").convert("L").resize((260, 260), Image.LANCZOS)
    wide = Image.new("I;16", gray.size)
    wide.putdata([v * 257 for v in gray.getdata()])
    wide.save(os.path.join(OUT, "camera_16bit.png"))
    for f in sorted(os.listdir(OUT)):
        if f.endswith(".md"):
            continue
        with Image.open(os.path.join(OUT, f)) as im:
            print(f"{f:18} {im.format:5} {im.mode:6} {im.size} frames={getattr(im, 'n_frames', 1)}")


if __name__ == "__main__":
    main()
