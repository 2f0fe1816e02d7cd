"""Builds a corpus of awkward files (valid and invalid) for the images/ingest/predict tests.

Not a test module: imported as ``from corpus import build_bad_corpus, make_valid_jpeg``.
Everything is deterministic and built in well under a second.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

GPS_LAT, GPS_LON = (45.0, 27.0, 36.0), (9.0, 11.0, 24.0)  # Milan: what a leak would reveal
PERSONAL_TEXT = b"Mario Rossi"  # must never survive cleaning
XMP_PACKET = (b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:Description "
              b"exif:GPSLatitude='45,27.6N' dc:creator='Mario Rossi'/></x:xmpmeta>")


def fruit_rgb(color=(200, 30, 30), size=(100, 100)) -> np.ndarray:
    """A deterministic fruit-like disc (ellipse) on a white background, HxWx3 uint8."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((xx - w / 2) ** 2 / (w * 0.4) ** 2 + (yy - h / 2) ** 2 / (h * 0.4) ** 2) <= 1
    img = np.full((h, w, 3), 255, np.uint8)
    img[disc] = color
    return img


def gps_exif(orientation: int | None = None) -> Image.Exif:
    """EXIF with camera make/model, owner and a GPSInfo IFD (tag 0x8825), built with Pillow only."""
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0110] = "PhoneModel X"  # Model
    exif[0x013B] = "Mario Rossi"  # Artist
    if orientation is not None:
        exif[0x0112] = orientation
    exif[0x8825] = {1: "N", 2: GPS_LAT, 3: "E", 4: GPS_LON}  # GPSLatitudeRef, GPSLatitude, ...
    return exif


def make_valid_jpeg(path, color=(200, 30, 30), size=(100, 100), exif: bytes | Image.Exif | None = None,
                    comment: bytes | None = None, **save_kwargs) -> Path:
    """Write a fruit-like disc on white as a JPEG (optionally with EXIF bytes/Image.Exif and a COM comment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": 92, **save_kwargs}
    if exif is not None:
        kwargs["exif"] = exif
    if comment is not None:
        kwargs["comment"] = comment
    Image.fromarray(fruit_rgb(color, size)).save(path, "JPEG", **kwargs)
    return path


def _insert_jpeg_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """Insert an APPn/COM segment right after SOI."""
    return jpeg[:2] + bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _iptc_app13() -> bytes:
    """A Photoshop 3.0 IRB holding an IPTC-IIM record with a byline (2:80)."""
    iim = b"\x1c\x02\x50" + struct.pack(">H", len(PERSONAL_TEXT)) + PERSONAL_TEXT
    irb = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iim)) + iim
    return b"Photoshop 3.0\x00" + irb


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def decompression_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid, tiny (~100 kB) 1-bit PNG whose header claims width x height pixels (all zero).

    One 256-row block is deflated once with a full flush (byte-aligned, no back-references
    out of the block), so the compressed block can simply be repeated: ~1 MB of RAM and a
    few milliseconds instead of pushing ~110 MB through zlib.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    block = row * 256
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate
    packed = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    reps, rest = divmod(height, 256)
    tail = comp.compress(row * rest) + comp.flush(zlib.Z_FINISH)
    adler = 1
    for _ in range(reps):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = b"\x78\xda" + packed * reps + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def build_bad_corpus(root: Path, valid_source_dir: Path | None = None) -> dict:
    """Create a mixed corpus under ``root/<Class folder>/``.

    Returns {"valid": [paths], "bad": [paths], "expected_reason": {bad path: reason substring}}.
    Every class folder holds at least two valid images (the train/test split needs two).
    """
    root = Path(root)
    valid: list[Path] = []
    bad: list[Path] = []
    reason: dict[Path, str] = {}
    apple, banana, odd = root / "Apple Red", root / "Banana", root / "Pomme rôtie 🍎"
    for d in (apple, banana, odd):
        d.mkdir(parents=True, exist_ok=True)
    disc = fruit_rgb()
    inside = disc[..., 0] == 200  # the red disc's pixels

    # --- valid but awkward -------------------------------------------------------
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[..., :3] = fruit_rgb((240, 200, 30))
    rgba[..., 3] = np.where(inside, 255, 0)  # transparent (black) background
    rgba[..., :3][~inside] = 0
    valid.append(_save(Image.fromarray(rgba, "RGBA"), banana / "alpha.png", "PNG"))

    valid.append(_save(Image.fromarray(disc[..., 0], "L"), apple / "gray.jpg", "JPEG"))
    valid.append(_save(Image.fromarray(disc).convert("CMYK"), apple / "cmyk.jpg", "JPEG"))

    arr16 = disc[..., 1].astype(np.uint16) * 257  # 255 -> 65535, 30 -> 7710
    arr16[0, 1], arr16[0, 2] = 32768, 256  # -> 128 and 1 after >> 8
    valid.append(_save(Image.fromarray(arr16), banana / "sixteen_bit.png", "PNG"))  # mode I;16

    p = apple / "rotated.jpg"  # stored 120 wide x 80 high, displayed 80 x 120
    make_valid_jpeg(p, size=(120, 80), exif=gps_exif(orientation=6))
    valid.append(p)

    p = apple / "gps_tagged.jpg"  # EXIF+GPS, XMP, COM, IPTC, ICC: the full privacy leak
    make_valid_jpeg(p, color=(180, 20, 40), exif=gps_exif(), comment=b"shot at 45.46N 9.19E by Mario Rossi",
                    icc_profile=b"\x00" * 128)
    data = _insert_jpeg_segment(p.read_bytes(), 0xE1, XMP_PACKET)
    p.write_bytes(_insert_jpeg_segment(data, 0xED, _iptc_app13()))
    valid.append(p)

    p = apple / "progressive exif.jpg"  # multi-scan JPEG with restart markers and GPS
    make_valid_jpeg(p, color=(170, 40, 30), exif=gps_exif(), progressive=True, restart_marker_rows=2)
    valid.append(p)

    # MPO (phone camera JPEG): primary picture, then a second frame with its own EXIF after EOI.
    frames = [Image.fromarray(fruit_rgb((230, 210, 40))), Image.fromarray(fruit_rgb((10, 200, 10)))]
    valid.append(_save(frames[0], banana / "phone mpo.jpg", "MPO", save_all=True, append_images=frames[1:],
                       exif=gps_exif()))

    p = odd / "pomme rôtie 🍎 01.jpg"
    valid.append(make_valid_jpeg(p, color=(150, 10, 10)))
    valid.append(make_valid_jpeg(odd / "second frame.jpg", color=(160, 15, 15)))

    pal = Image.fromarray(fruit_rgb((250, 220, 40))).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    valid.append(_save(pal, banana / "palette_trns.png", "PNG", transparency=0))

    txt = Image.fromarray(fruit_rgb((240, 220, 50)))
    info = PngInfo()
    info.add_text("Author", "Mario Rossi")
    info.add_itxt("XML:com.adobe.xmp", XMP_PACKET.split(b"\x00", 1)[1].decode())
    valid.append(_save(txt, banana / "texty.png", "PNG", pnginfo=info, exif=gps_exif()))

    valid.append(_save(Image.fromarray(fruit_rgb((230, 200, 20))), banana / "lossless.webp", "WEBP",
                       lossless=True, exif=gps_exif()))
    valid.append(_save(Image.fromarray(fruit_rgb((220, 190, 20))), banana / "plain.bmp", "BMP"))
    valid.append(_save(Image.fromarray(fruit_rgb((210, 180, 20))), banana / "plain.tiff", "TIFF"))

    if valid_source_dir is not None:
        for i, src in enumerate(sorted(Path(valid_source_dir).glob("*.jpg"))[:4]):
            dst = banana / f"real_{i}.jpg"
            shutil.copy(src, dst)
            valid.append(dst)

    # --- bad ---------------------------------------------------------------------
    def add_bad(path: Path, data: bytes | None, expect: str) -> None:
        if data is not None:
            path.write_bytes(data)
        bad.append(path)
        reason[path] = expect

    good = io.BytesIO()
    Image.fromarray(disc).save(good, "JPEG", quality=92)
    good_jpeg = good.getvalue()
    add_bad(apple / "zero.jpg", b"", "empty file")
    add_bad(apple / "truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "truncated")
    add_bad(apple / "notes.jpg", b"this is a text file, not a picture\n" * 20, "not an image")
    add_bad(banana / "bomb.png", decompression_bomb_png(), "decompression bomb")
    frames = [Image.fromarray(fruit_rgb(c)) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add_bad(banana / "animated.gif", buf.getvalue(), "animated image with 3 frames")
    png = io.BytesIO()
    Image.fromarray(disc).save(png, "PNG")
    data = bytearray(png.getvalue())
    data[40:80] = b"\x00" * 40  # garbage inside IDAT, CRC now wrong
    add_bad(banana / "corrupt.png", bytes(data), "corrupt")
    ihdr = struct.pack(">IIBBBBB", 100, 100, 8, 2, 0, 0, 0)  # valid header, CRCs fine, IDAT is noise
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    garbage = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"\x78\x9c" + noise)
               + _png_chunk(b"IEND", b""))
    add_bad(banana / "garbage idat.png", garbage, "corrupt")
    link = apple / "x.jpg"  # dangling symlink: unreadable even for root
    os.symlink(root / "does-not-exist.jpg", link)
    add_bad(link, None, "unreadable")
    add_bad(apple / "readme.txt", b"not an image", "not an image")  # judged by content, not by its name
    if os.geteuid() != 0:  # root ignores permissions
        p = apple / "no_permission.jpg"
        make_valid_jpeg(p)
        p.chmod(0)
        add_bad(p, None, "unreadable")
    return {"valid": valid, "bad": bad, "expected_reason": reason}
