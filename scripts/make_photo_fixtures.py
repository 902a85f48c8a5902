#!/usr/bin/env python3
"""Make tests/fixtures/photos/: distinct sample photos from scikit-image's
wheel (public domain / CC0, see skimage/data/README.txt in the wheel) for
the near-duplicate quality test. Each is saved once as a JPEG (quality 92,
longest side at most 384 px); the test derives the near-duplicates itself
(resize, JPEG recompression, 10% crop, overlay).

Left out: motorcycle_right (a stereo twin of motorcycle_left, a real
near-duplicate), the synthetic chessboard/phantom, and lfw faces (25 px).
Run: scripts/make_photo_fixtures.sh
"""
import io
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from make_image_fixtures import skimage_wheel  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "photos")
PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
    "logo.png", "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg",
    "text.png",
]


def main():
    os.makedirs(OUT, exist_ok=True)
    z = skimage_wheel()
    for name in PHOTOS:
        im = Image.open(io.BytesIO(z.read("skimage/data/" + name)))
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        im.thumbnail((384, 384), Image.LANCZOS)
        base = os.path.splitext(name)[0]
        im.save(os.path.join(OUT, base + ".jpg"), quality=92)
        print(base, im.size)


if __name__ == "__main__":
    main()
