"""Decode, validate and de-identify image bytes: the only place that parses images.

Pure functions, thread-safe, used by Spark workers (ingest, featurizer) and the
HTTP server alike. Pillow's global ``MAX_IMAGE_PIXELS`` is left alone: sizes are
checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # per frame; larger = decompression bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

# JPEG segments kept by the lossless strip: APP0 (JFIF) and APP14 (Adobe colour transform).
_KEEP_APP = {0xE0, 0xEE}


class BadImage(ValueError):
    """Bytes that are not a usable image; ``reason`` is a short plain-English sentence."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CleanImage:
    content: bytes  # metadata-free encoded image
    format: str  # "jpeg" or "png"
    width: int
    height: int
    image_id: str  # SHA-256 of the normalised pixels


_SIGNATURES = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF", b"RIFF": "WebP"}


def _signature(data: bytes) -> str | None:
    return next((kind for magic, kind in _SIGNATURES.items() if data.startswith(magic)), None)


def _open(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    if not data:
        raise BadImage("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise BadImage(f"file too large: {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = _signature(data)
        if kind:
            raise BadImage(f"truncated or corrupt {kind} data (header unreadable)") from None
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise BadImage(f"truncated or corrupt image data: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} pixels exceeds the {max_pixels}-pixel limit")
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format in ("GIF", "PNG", "WEBP"):
        raise BadImage(f"animated image with {frames} frames: export a single frame")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / hi), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        # Fruits-360 backgrounds are white: composite transparent areas over white.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _decode(data: bytes, max_pixels: int, max_bytes: int) -> tuple[Image.Image, np.ndarray]:
    img = _open(data, max_pixels, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            oriented = ImageOps.exif_transpose(img)
            rgb = np.ascontiguousarray(np.asarray(_to_rgb(oriented), dtype=np.uint8))
    except BadImage:
        raise
    except Exception as exc:  # OSError (truncated), SyntaxError, ValueError, ...
        raise BadImage(f"truncated or corrupt image data: {exc}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise BadImage(f"unsupported pixel layout {rgb.shape}")
    return img, rgb


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB: EXIF orientation applied, alpha over white, any mode to 8-bit RGB."""
    return _decode(data, max_pixels, max_bytes)[1]


def pixel_id(rgb: np.ndarray) -> str:
    """Pseudonymous image id: SHA-256 of the pixel content (shape-prefixed)."""
    h, w = rgb.shape[:2]
    digest = hashlib.sha256(f"{h}x{w}x3:".encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


def _strip_jpeg(data: bytes) -> bytes | None:
    """Copy a JPEG's marker stream minus APPn (but JFIF/Adobe) and COM; None if unparseable."""
    if data[:2] != b"\xff\xd8":
        return None
    out = bytearray(b"\xff\xd8")
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI
            out += b"\xff\xd9"
            return bytes(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            out += bytes((0xFF, marker))
            continue
        if i + 2 > n:
            return None
        (length,) = struct.unpack(">H", data[i : i + 2])
        segment = data[i : i + length]
        if len(segment) != length or length < 2:
            return None
        i += length
        if marker == 0xDA:  # SOS: the rest is entropy-coded data (+ more scans), copy verbatim
            out += bytes((0xFF, marker)) + segment + data[i:]
            return bytes(out)
        if (0xE0 <= marker <= 0xEF and marker not in _KEEP_APP) or marker == 0xFE:
            continue  # EXIF/GPS, XMP, ICC, IPTC, maker notes, comments
        out += bytes((0xFF, marker)) + segment
    return None


def clean_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> CleanImage:
    """Validate and remove all metadata; lossless where the format allows.

    A JPEG in RGB/L with no EXIF rotation keeps its compressed data (only metadata
    segments go); anything else is re-encoded as PNG from the normalised pixels.
    """
    img, rgb = _decode(data, max_pixels, max_bytes)
    image_id = pixel_id(rgb)
    h, w = rgb.shape[:2]
    orientation = 1
    if img.format == "JPEG":
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
        except Exception:
            orientation = 1
    if img.format == "JPEG" and img.mode in ("RGB", "L") and orientation == 1:
        stripped = _strip_jpeg(data)
        if stripped is not None:
            # Grayscale JPEGs stay single-channel; decode_rgb expands them identically.
            return CleanImage(stripped, "jpeg", w, h, image_id)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=6)
    return CleanImage(buf.getvalue(), "png", w, h, image_id)


_PNG_META_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP", b"tIME"}


def has_metadata(data: bytes) -> list[str]:
    """Names of metadata blocks found in the bytes (empty list = clean)."""
    found: list[str] = []
    if data[:2] == b"\xff\xd8":
        i, n = 2, len(data)
        while i + 4 <= n and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xDA or marker == 0xD9:
                break
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            seg = data[i + 4 : i + 2 + length]
            if marker == 0xE1 and seg.startswith(b"Exif"):
                found.append("EXIF")
                if b"\x88\x25" in seg[:4096] or b"\x25\x88" in seg[:4096]:
                    found.append("GPS")
            elif marker == 0xE1:
                found.append("XMP")
            elif marker == 0xE2:
                found.append("ICC")
            elif marker == 0xED:
                found.append("IPTC")
            elif marker == 0xFE:
                found.append("COM")
            elif 0xE0 <= marker <= 0xEF and marker not in _KEEP_APP:
                found.append(f"APP{marker - 0xE0}")
            i += 2 + length
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        i = 8
        while i + 8 <= len(data):
            (length,) = struct.unpack(">I", data[i : i + 4])
            ctype = data[i + 4 : i + 8]
            if ctype in _PNG_META_CHUNKS:
                found.append(f"PNG {ctype.decode()} chunk")
            i += 12 + length
    if b"Exif\x00\x00" in data and "EXIF" not in found:
        found.append("EXIF")
    if b"http://ns.adobe.com/xap" in data and "XMP" not in found:
        found.append("XMP")
    return found


