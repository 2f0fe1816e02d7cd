"""Builds a corpus of awkward files (valid and invalid) for ingest/predict/serve tests."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def fruit_rgb(color=(200, 30, 30), size=(100, 100)) -> np.ndarray:
    """A deterministic fruit-like disc on a white background."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((xx - w / 2) ** 2 / (w * 0.4) ** 2 + (yy - h / 2) ** 2 / (h * 0.4) ** 2) <= 1
    img = np.full((h, w, 3), 255, np.uint8)
    img[disc] = color
    return img


def gps_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0110] = "PhoneModel X"  # Model
    gps = {1: "N", 2: (45.0, 27.0, 36.0), 3: "E", 4: (9.0, 11.0, 24.0)}
    exif[0x8825] = gps
    return exif


def make_valid_jpeg(path: Path, color=(200, 30, 30), size=(100, 100), exif: Image.Exif | None = None,
                    comment: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": 92}
    if exif is not None:
        kwargs["exif"] = exif
    if comment is not None:
        kwargs["comment"] = comment
    Image.fromarray(fruit_rgb(color, size)).save(path, "JPEG", **kwargs)
    return path


def _insert_xmp(jpeg: bytes) -> bytes:
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description exif:GPSLatitude='45,27N'/></x:xmpmeta>"
    seg = b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp
    return jpeg[:2] + seg + jpeg[2:]


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def decompression_bomb_png(width=30000, height=30000) -> bytes:
    """A small PNG whose header claims width x height 1-bit pixels (all zero)."""
    raw_row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(raw_row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def build_bad_corpus(root: Path, valid_source_dir: Path | None = None) -> dict:
    """Create a mixed corpus under ``root/<Class>/``.

    Returns {"valid": [paths], "bad": [paths], "expected_reason": {path: substring}}.
    """
    valid: list[Path] = []
    bad: list[Path] = []
    reason: dict[Path, str] = {}
    apple, banana, odd = root / "Apple Red", root / "Banana", root / "Pomme rôtie 🍎"
    for d in (apple, banana, odd):
        d.mkdir(parents=True, exist_ok=True)

    # --- valid but awkward ---
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[..., :3] = fruit_rgb((240, 200, 30))
    rgba[..., 3] = np.where(fruit_rgb()[..., 0] == 200, 255, 0)
    p = banana / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    valid.append(p)

    p = apple / "gray.jpg"
    Image.fromarray(fruit_rgb()[..., 0], "L").save(p, "JPEG")
    valid.append(p)

    p = apple / "cmyk.jpg"
    Image.fromarray(fruit_rgb()).convert("CMYK").save(p, "JPEG")
    valid.append(p)

    p = banana / "sixteen_bit.png"
    arr16 = (fruit_rgb()[..., 1].astype(np.uint16) * 257)
    Image.fromarray(arr16).save(p)  # uint16 -> mode I;16
    valid.append(p)

    p = apple / "rotated.jpg"
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90° CW on display
    make_valid_jpeg(p, size=(120, 80), exif=ex)
    valid.append(p)

    p = apple / "gps_tagged.jpg"
    make_valid_jpeg(p, color=(180, 20, 40), exif=gps_exif(), comment=b"shot at 45.46N 9.19E by Mario Rossi")
    p.write_bytes(_insert_xmp(p.read_bytes()))
    valid.append(p)

    p = odd / "pomme rôtie 🍎 01.jpg"
    make_valid_jpeg(p, color=(150, 10, 10))
    valid.append(p)
    p = odd / "second frame.jpg"
    make_valid_jpeg(p, color=(160, 15, 15))
    valid.append(p)

    p = banana / "palette_trns.png"
    pal = Image.fromarray(fruit_rgb((250, 220, 40))).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    pal.save(p, transparency=0)
    valid.append(p)

    if valid_source_dir is not None:
        for i, src in enumerate(sorted(Path(valid_source_dir).glob("*.jpg"))[:4]):
            dst = banana / f"real_{i}.jpg"
            shutil.copy(src, dst)
            valid.append(dst)

    # --- bad ---
    def add_bad(path: Path, data: bytes | None, expect: str) -> None:
        if data is not None:
            path.write_bytes(data)
        bad.append(path)
        reason[path] = expect

    add_bad(apple / "zero.jpg", b"", "empty file")
    good = make_valid_jpeg(root / "tmp_src.jpg").read_bytes()
    (root / "tmp_src.jpg").unlink()
    add_bad(apple / "truncated.jpg", good[: len(good) // 2], "truncated")
    add_bad(apple / "notes.jpg", b"this is a text file, not a picture\n" * 20, "not an image")
    add_bad(banana / "bomb.png", decompression_bomb_png(), "decompression bomb")
    frames = [Image.fromarray(fruit_rgb(c)) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add_bad(banana / "animated.gif", buf.getvalue(), "animated")
    png = io.BytesIO()
    Image.fromarray(fruit_rgb()).save(png, "PNG")
    data = bytearray(png.getvalue())
    data[40:80] = b"\x00" * 40  # garbage inside IDAT, CRC now wrong
    add_bad(banana / "corrupt.png", bytes(data), "corrupt")
    link = apple / "dangling.jpg"
    os.symlink(root / "does-not-exist.jpg", link)
    add_bad(link, None, "unreadable")
    add_bad(apple / "readme.txt", b"not an image", "unsupported file type")
    if os.geteuid() != 0:
        p = apple / "no_permission.jpg"
        make_valid_jpeg(p)
        p.chmod(0)
        add_bad(p, None, "unreadable")
    return {"valid": valid, "bad": bad, "expected_reason": reason}
