"""Augmented views of a real photo: the same fruit under another crop, mirror, light and focus.

One source of real photos shows its fruit in a few shops or kitchens; photos from elsewhere
frame, light and focus it otherwise. Training on several seeded views of each family-labelled
photo (``canestra train --augment-views N``) lifted family top-1 on photos of *another* source by
7-15 points on the cross-source bench (docs/outside-the-studio.md section 7). A view depends only
on the photo's pixels, the view number and ``RECIPE``, so its embedding is stored once in the
feature store and reused by every later run.
"""

from __future__ import annotations

import io

import numpy as np

# view is a hook for the benches (bench/cross_source.py).
__all__ = ["RECIPE", "view", "view_jpeg"]

RECIPE = "v1"  # bump when ``view`` changes: names a new feature-store folder


def view(rgb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """View ``k`` of a photo: a random square crop (55-90 % of the short side), mirrored for even
    ``k``, brightness, saturation and contrast within +-30 %, sometimes a slight blur."""
    from PIL import Image, ImageEnhance, ImageFilter

    rng = np.random.default_rng(seed * 101 + k)
    h, w = rgb.shape[:2]
    s = max(1, int(min(h, w) * rng.uniform(0.55, 0.9)))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    im = Image.fromarray(np.ascontiguousarray(rgb[y : y + s, x : x + s]))
    if k % 2 == 0:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return np.asarray(im)


def seed_of(image_id: str) -> int:
    """The view seed of an image: from its id (the SHA-256 of its pixels), so views are reproducible."""
    return int(image_id[:12], 16)


def view_jpeg(content: bytes, image_id: str, k: int) -> bytes:
    """Encoded view ``k`` of an image's cleaned bytes (PNG: lossless, so the CNN sees the view itself)."""
    from PIL import Image

    from canestra.vision.images import decode_rgb

    out = io.BytesIO()
    Image.fromarray(view(decode_rgb(content), k, seed_of(image_id))).save(out, format="PNG", compress_level=1)
    return out.getvalue()
