"""Synthetic scenes: studio fruit cut out of its white background and pasted onto real backgrounds.

Fruits-360 shows every fruit alone on white; users photograph fruit on tables, in bowls and
on shelves. A scene gives a studio class web-like training photos: the fruit is cut out
(``cutout``: near-white pixels connected to the border become transparent), then several copies
are pasted at random scales, rotations, positions and lighting onto a background photo
(``compose``), and the result is blurred or not, like a phone photo. Everything is seeded, so
the same (fruit, background, seed) always gives the same pixels, hence the same image id and a
feature-store hit on a re-run.

Backgrounds should hold no fruit: ``background_crops`` cuts fruit-free squares out of photos with
Pascal VOC boxes (``real-photos-boxes/``), or any photo folder of empty scenes can serve.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

# The whole module is a hook for the benches (bench/cross_source.py).
__all__ = ["backgrounds_from_boxes", "compose", "cutout"]

WHITE_LEVEL = 232  # a studio pixel at or above this in every channel is background (JPEG keeps it ~250)
SCENE_SIZE = 256


def cutout(rgb: np.ndarray) -> np.ndarray:
    """RGBA of a studio image: the white background (the near-white region that touches the
    border) transparent, the fruit opaque, edges softened by one pixel."""
    from PIL import Image, ImageFilter

    white = np.asarray((rgb >= WHITE_LEVEL).all(axis=2))
    # Grow the background from the border through white pixels (a flood fill by repeated numpy
    # dilation): white highlights inside the fruit, not connected to the border, stay opaque.
    bg = np.zeros_like(white)
    bg[0, :], bg[-1, :], bg[:, 0], bg[:, -1] = white[0, :], white[-1, :], white[:, 0], white[:, -1]
    while True:
        grown = bg.copy()
        grown[1:, :] |= bg[:-1, :]
        grown[:-1, :] |= bg[1:, :]
        grown[:, 1:] |= bg[:, :-1]
        grown[:, :-1] |= bg[:, 1:]
        grown &= white
        if np.array_equal(grown, bg):
            break
        bg = grown
    alpha = Image.fromarray(np.where(bg, 0, 255).astype(np.uint8)).filter(ImageFilter.MinFilter(3))
    alpha = alpha.filter(ImageFilter.GaussianBlur(0.8))
    return np.dstack([rgb, np.asarray(alpha)])


def compose(fruits: list[np.ndarray], background: np.ndarray, seed: int, size: int = SCENE_SIZE) -> np.ndarray:
    """An RGB scene of ``size`` px: 1-4 of the RGBA ``fruits`` (cycled) on ``background``."""
    from PIL import Image, ImageEnhance, ImageFilter

    rng = np.random.default_rng(seed)
    bh, bw = background.shape[:2]
    s = int(min(bh, bw) * rng.uniform(0.6, 1.0))
    y, x = int(rng.integers(0, bh - s + 1)), int(rng.integers(0, bw - s + 1))
    scene = Image.fromarray(np.ascontiguousarray(background[y : y + s, x : x + s])).resize((size, size))
    if rng.random() < 0.5:
        scene = scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    n = int(rng.choice([1, 1, 2, 3, 4]))
    # One fruit fills much of the frame (as users shoot it); several are smaller.
    lo, hi = (0.45, 0.85) if n == 1 else (0.28, 0.55)
    light = rng.uniform(0.75, 1.2)  # one light for the whole scene
    for i in range(n):
        fruit = Image.fromarray(fruits[(i + int(rng.integers(0, len(fruits)))) % len(fruits)], "RGBA")
        side = int(size * rng.uniform(lo, hi))
        fruit = fruit.resize((side, side), Image.Resampling.BILINEAR)
        fruit = fruit.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR, expand=False)
        rgb, a = fruit.convert("RGB"), fruit.getchannel("A")
        rgb = ImageEnhance.Brightness(rgb).enhance(light * rng.uniform(0.9, 1.1))
        rgb = ImageEnhance.Color(rgb).enhance(rng.uniform(0.8, 1.2))
        px, py = int(rng.integers(-side // 5, size - side + side // 5)), int(rng.integers(-side // 5, size - side + side // 5))
        scene.paste(rgb, (px, py), a)
    if rng.random() < 0.4:
        scene = scene.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.2))))
    return np.asarray(scene)


def _boxes(xml_path: str) -> list[tuple[int, ...]]:
    root = ET.parse(xml_path).getroot()
    out = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is not None:
            out.append(tuple(int(float(bb.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return out


def background_crops(rgb: np.ndarray, boxes: list[tuple[int, ...]], seed: int, tries: int = 60,
                     min_side: int = 64) -> list[np.ndarray]:
    """Up to two squares of ``rgb`` that overlap none of ``boxes`` (x0, y0, x1, y1), largest found first."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    found: list[tuple[int, ...]] = []
    for side in np.linspace(min(h, w), min_side, 8).astype(int):
        for _ in range(tries // 8):
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            if all(x + side <= b[0] or b[2] <= x or y + side <= b[1] or b[3] <= y for b in boxes) and \
                    all(x + side <= f[0] or f[2] <= x or y + side <= f[1] or f[3] <= y for f in found):
                found.append((x, y, x + side, y + side))
                if len(found) == 2:
                    break
        if len(found) == 2:
            break
    return [np.ascontiguousarray(rgb[y0:y1, x0:x1]) for x0, y0, x1, y1 in found]


def backgrounds_from_boxes(photos_root: str, boxes_root: str, decode) -> list[np.ndarray]:
    """Fruit-free squares of every ``<photos_root>/<Folder>/<name>.jpg`` that has a
    ``<boxes_root>/<Folder>/<name>.xml``; ``decode`` turns file bytes into RGB."""
    out: list[np.ndarray] = []
    for folder in sorted(os.listdir(boxes_root)):
        for xml in sorted(os.listdir(os.path.join(boxes_root, folder))):
            stem = os.path.splitext(xml)[0]
            for ext in (".jpg", ".jpeg", ".png"):
                photo = os.path.join(photos_root, folder, stem + ext)
                if os.path.exists(photo):
                    with open(photo, "rb") as fh:
                        rgb = decode(fh.read())
                    out += background_crops(rgb, _boxes(os.path.join(boxes_root, folder, xml)), len(out))
                    break
    return out
