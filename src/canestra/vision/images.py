"""Decode, validate and de-identify image bytes: the only place that parses images.

Pure functions, thread-safe, used by Spark workers (ingest, featurizer) and the HTTP
server alike. No global state is touched (except that pillow-heif's opener is registered
with Pillow, once, on the first HEIC seen): Pillow's ``MAX_IMAGE_PIXELS`` and the
``warnings`` filters are left alone (``warnings.catch_warnings`` is process-global
and not thread-safe before Python 3.14). Instead sizes are read from the file header
by a small sniffer and rejected *before* Pillow is asked to open or decode anything.

GDPR data minimisation: :func:`clean_image` keeps only pixels. JPEGs in RGB/L with
no EXIF rotation are stripped losslessly at the marker level (the entropy-coded data
is copied byte for byte); everything else is re-encoded as a bare PNG of the
normalised pixels. :func:`has_metadata` is the audit counterpart.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError, features

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "BadImage", "clean_image", "decode_rgb", "decoded_size",
           "pixel_id", "sniff_format"]

DEFAULT_MAX_PIXELS = 40_000_000  # per frame; larger = decompression bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

# Formats Pillow may try, whatever the file is called: the format is read from the bytes.
# Restricting the plugins keeps exotic, rarely-fuzzed decoders (EPS, ICO, PSD, ...) off
# untrusted input. AVIF is Pillow's own (>= 11.2 built with libavif); HEIF is pillow-heif's.
_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP") + (("AVIF",) if features.check("avif") else ())

# ISO-BMFF brands (ftyp box, major or compatible). AVIF files usually list mif1 too, so
# AVIF is checked first.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
_heif_lock = threading.Lock()
_heif_registered = False

# Signatures recognised only to give a better reason than "not an image".
_UNSUPPORTED = (
    (b"8BPS", 0, "PSD"), (b"\x00\x00\x01\x00", 0, "ICO"), (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"), (b"%PDF", 0, "PDF"),
)

# Pillow's transpose for each EXIF orientation, as numpy views (same result as
# ImageOps.exif_transpose, checked in the tests), applied to the HxWx3 array.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90 (90 degrees anticlockwise)
}

# JPEG markers. SOFn = C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Kept verbatim by the lossless strip: what a decoder needs and nothing else.
_JPEG_KEEP = _SOF | {0xC4, 0xCC, 0xDB, 0xDD, 0xDC}  # + DHT, DAC, DQT, DRI, DNL
_SOS, _EOI, _APP0, _APP14, _COM = 0xDA, 0xD9, 0xE0, 0xEE, 0xFE
_ENTROPY, _TRAILER = -1, -2  # pseudo-markers yielded by _jpeg_segments


class BadImage(ValueError):
    """Bytes that are not a usable image; ``reason`` (== ``str(err)``) says why in plain English."""

    reason: str

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CleanImage:
    """A validated, metadata-free image."""

    content: bytes  # metadata-free encoded image
    format: str  # "jpeg" (lossless marker strip) or "png" (re-encoded normalised pixels)
    width: int
    height: int
    image_id: str  # pixel_id(decode_rgb(content)) == pixel_id(decode_rgb(original))


# ---------------------------------------------------------------------------- JPEG structure


class _Malformed(Exception):
    pass


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Walk a JPEG: yield (marker, start, end) with ``data[start:end]`` the whole segment.

    Segments start at their 0xFF (fill bytes before it are skipped, hence dropped by
    anyone who re-joins the slices). Entropy-coded data after each SOS is yielded as
    ``_ENTROPY``; bytes after EOI as ``_TRAILER``. Raises _Malformed on broken structure.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise _Malformed("no SOI")
    pos, in_scan = 2, False
    while True:
        if in_scan:
            # Entropy-coded data: 0xFF is followed by 0x00 (stuffing) or RSTn; anything
            # else is the next marker (DHT/SOS between progressive scans, or EOI).
            k = pos
            while True:
                k = data.find(b"\xff", k)
                if k < 0 or k + 1 >= n:
                    raise _Malformed("no EOI")
                nxt = data[k + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    k += 2
                    continue
                break
            yield _ENTROPY, pos, k
            pos = k
        if pos >= n or data[pos] != 0xFF:
            raise _Malformed(f"expected a marker at byte {pos}")
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            raise _Malformed("no EOI")
        marker = data[pos + 1]
        if marker == _EOI:
            yield _EOI, pos, pos + 2
            if pos + 2 < n:
                yield _TRAILER, pos + 2, n
            return
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            raise _Malformed(f"unexpected marker 0x{marker:02X}")
        if pos + 4 > n:
            raise _Malformed("truncated segment")
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end > n or end < pos + 4:
            raise _Malformed("bad segment length")
        yield marker, pos, end
        pos, in_scan = end, marker == _SOS


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOFn, without decoding."""
    try:
        for marker, start, end in _jpeg_segments(data):
            if marker in _SOF and end - start >= 9:
                height, width = struct.unpack_from(">HH", data, start + 5)
                return width, height
            if marker == _SOS:
                return None
    except _Malformed:
        return None
    return None


def _strip_jpeg(data: bytes) -> bytes | None:
    """Rebuild a JPEG from a whitelist of segments; None if it can't be done safely.

    Keeps SOI, a JFIF APP0 (thumbnail removed), an Adobe APP14 (its colour-transform
    flag changes decoding), DQT/DHT/DAC/DRI/DNL/SOFn/SOS, the entropy-coded data and EOI.
    Drops APP1-APP13/APP15 (EXIF, GPS, XMP, ICC, MPF, IPTC, maker notes), COM and any
    trailer after EOI (MPO second frames, phone "motion photo" videos, ...). An unknown
    marker means an unusual file: None, so the caller re-encodes instead of guessing.
    """
    out = [b"\xff\xd8"]
    try:
        for marker, start, end in _jpeg_segments(data):
            if marker == _ENTROPY or marker == _SOS or marker == _EOI or marker in _JPEG_KEEP:
                out.append(data[start:end])
            elif marker == _APP0:
                body = data[start + 4 : end]
                # JFIF: keep version, units, density; zero the thumbnail (a preview of
                # the original photo, possibly before cropping) and drop its pixels.
                if body[:5] == b"JFIF\x00" and len(body) >= 14:
                    out.append(b"\xff\xe0\x00\x10" + body[:12] + b"\x00\x00")
            elif marker == _APP14:
                body = data[start + 4 : end]
                if body[:5] == b"Adobe" and len(body) >= 12:
                    out.append(b"\xff\xee\x00\x0e" + body[:12])
            elif 0xE1 <= marker <= 0xEF or marker == _COM or marker == _TRAILER:
                continue  # metadata
            else:
                return None
    except _Malformed:
        return None
    return b"".join(out)


# ---------------------------------------------------------------------------- header sniffing


def _sniff_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read straight from the header, for the bomb check; None if unknown."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack_from(">II", data, 16)
            return "PNG", w, h
        if data[:2] == b"\xff\xd8":
            size = _jpeg_size(data)
            return ("JPEG", *size) if size else None
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack_from("<HH", data, 6)
            return "GIF", w, h
        if data[:2] == b"BM":
            if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER
                w, h = struct.unpack_from("<HH", data, 18)
            else:
                w, h = struct.unpack_from("<ii", data, 18)
            return "BMP", abs(w), abs(h)  # negative height = top-down rows
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                return "WEBP", 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return "WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 ":
                w, h = struct.unpack_from("<HH", data, 26)
                return "WEBP", w & 0x3FFF, h & 0x3FFF
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except struct.error:
        return None
    return None


def _tiff_size(data: bytes) -> tuple[str, int, int] | None:
    """ImageWidth/ImageLength of the first IFD."""
    e = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(e + "I", data, 4)
    (count,) = struct.unpack_from(e + "H", data, ifd)
    dims = {}
    for i in range(min(count, 512)):
        tag, typ = struct.unpack_from(e + "HH", data, ifd + 2 + 12 * i)
        if tag in (256, 257):
            fmt = e + ("H" if typ == 3 else "I")
            dims[tag] = struct.unpack_from(fmt, data, ifd + 2 + 12 * i + 8)[0]
    if 256 in dims and 257 in dims:
        return "TIFF", dims[256], dims[257]
    return None


def _pixel_limit(max_pixels: int) -> int:
    # Pillow warns above its own (read, never written) MAX_IMAGE_PIXELS and errors above
    # twice that; honouring it here turns both into a BadImage instead of a warning.
    pil_limit = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pil_limit) if pil_limit else max_pixels


def _check_size(w: int, h: int, limit: int) -> None:
    if w <= 0 or h <= 0:
        raise BadImage(f"truncated or corrupt image data: invalid size {w}x{h}")
    if w * h > limit:
        raise BadImage(f"decompression bomb: {w}x{h} pixels exceeds the {limit}-pixel limit")


def _short(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


# ---------------------------------------------------------------------------- decoding


def _open(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    if not data:
        raise BadImage("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise BadImage(f"file too large: {len(data)} bytes exceeds the {max_bytes}-byte limit")
    limit = _pixel_limit(max_pixels)
    sniffed = _sniff_size(data)
    if sniffed is not None:
        _check_size(sniffed[1], sniffed[2], limit)  # before Pillow allocates anything
    kind = sniff_format(data)
    formats = _FORMATS
    if kind == "AVIF" and "AVIF" not in _FORMATS:
        raise BadImage("unsupported image format AVIF: this Pillow has no AVIF support (Pillow >= 11.2 "
                       "has it), or convert it to JPEG")
    if kind == "HEIF":
        formats = _FORMATS + (_heif_format(),)
    try:
        img = Image.open(io.BytesIO(data), formats=formats)  # parses the header only
        _check_size(*img.size, limit)  # authoritative size (formats the sniffer doesn't know)
        # n_frames walks the frame headers (GIF blocks, TIFF IFDs), so it can fail too.
        frames = getattr(img, "n_frames", 1)
    except BadImage:
        raise
    except UnidentifiedImageError:
        if kind:
            raise BadImage(f"truncated or corrupt {kind} data (header unreadable)") from None
        for magic, offset, name in _UNSUPPORTED:
            if data[offset : offset + len(magic)] == magic:
                raise BadImage(f"unsupported image format {name}: convert it to JPEG or PNG") from None
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {_short(exc)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # SyntaxError, OSError, struct.error, ... from a plugin
        raise BadImage(f"truncated or corrupt {kind or 'image'} data: {_short(exc)}") from None
    # MPO (phone JPEG + depth map / preview frames) is one picture: frame 0 is used. A HEIF
    # holding several images (bursts, edits) opens on its primary image, the photo shown.
    if frames > 1 and img.format not in ("MPO", "HEIF"):
        raise BadImage(f"animated image with {frames} frames: export a single frame")
    return img


def sniff_format(data: bytes) -> str | None:
    """The image format the leading bytes (magic numbers) announce, or None: never the file name.

    JPEG, PNG, GIF, BMP, TIFF, WEBP, AVIF or HEIF (HEIC included). A few dozen bytes suffice.
    """
    data = _as_bytes(data[:64])
    for magic, kind in ((b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                        (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")):
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        box = min(len(data), max(16, int.from_bytes(data[:4], "big")))
        brands = {data[8:12]} | {data[i : i + 4] for i in range(16, box - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
    return None


def _heif_format() -> str:
    """Pillow's format name for HEIF, registering pillow-heif's opener on first use (any thread)."""
    global _heif_registered
    with _heif_lock:
        if not _heif_registered:
            try:
                import pillow_heif
            except ImportError:
                raise BadImage("HEIC/HEIF image, but pillow-heif is not installed: pip install pillow-heif, "
                               "or convert it to JPEG") from None
            pillow_heif.register_heif_opener()
            _heif_registered = True
    return "HEIF"


def _orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation as ImageOps.exif_transpose reads it; 1 if absent or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block must not sink a good picture; it is dropped anyway
        return 1
    return value if isinstance(value, int) and value in _ORIENT else 1


def _gray16_to_8(arr: np.ndarray) -> np.ndarray:
    # 16-bit samples: keep the high byte (65535 -> 255, 32768 -> 128), as Pillow does for 16-bit RGB PNGs.
    return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA over white (Fruits-360 backgrounds are white), rounding to nearest."""
    alpha = rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return rgba[..., :3]
    a = alpha.astype(np.uint16)
    out = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 of a loaded image in any Pillow mode."""
    mode = img.mode
    transparency = img.info.get("transparency")
    if mode in ("RGB", "L") and transparency is None:
        arr = np.asarray(img if mode == "RGB" else img.convert("RGB"))
        return arr
    if mode.startswith("I;16") or mode in ("I", "F"):
        raw = np.asarray(img)
        if mode == "F":  # float: Pillow's own convention, 0..255 clipped
            gray = np.clip(np.nan_to_num(raw), 0, 255).round().astype(np.uint8)
        else:  # 16-bit (I;16*, and "I" from 16-bit PNGs on older Pillow)
            gray = _gray16_to_8(raw)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        if isinstance(transparency, int) and mode != "F":
            rgb[raw == transparency] = 255  # tRNS colour key -> white
        return rgb
    if transparency is not None or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _over_white(np.asarray(img.convert("RGBA")))
    return np.asarray(img.convert("RGB"))  # 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)  # bytearray/memoryview from Spark or a socket


def _decode(data: bytes, max_pixels: int, max_bytes: int) -> tuple[str, str, bool, np.ndarray]:
    """(Pillow format, Pillow mode, rotated?, HxWx3 uint8 C-contiguous RGB)."""
    img = _open(data, max_pixels, max_bytes)
    try:
        with img:
            img.load()  # full decode: truncated data fails here, not later
            orientation = _orientation(img)
            rgb = _to_rgb(img)
            fmt, mode = img.format or "", img.mode
    except BadImage:
        raise
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:  # GIF frames / TIFF tiles checked at load
        raise BadImage(f"decompression bomb: {_short(exc)}") from None
    except Exception as exc:  # OSError (truncated), SyntaxError, ValueError, ...
        kind = "JPEG" if img.format == "MPO" else img.format or "image"
        raise BadImage(f"truncated or corrupt {kind} data: {_short(exc)}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise BadImage(f"unsupported pixel layout {rgb.shape} {rgb.dtype} (mode {mode})")
    rotated = orientation != 1
    if rotated:
        rgb = _ORIENT[orientation](rgb)
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # np.asarray over Pillow's bytes is read-only; callers own the result
        rgb = rgb.copy()
    return fmt, mode, rotated, rgb


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode to an HxWx3 uint8 C-contiguous RGB array, or raise BadImage.

    EXIF orientation applied; alpha/transparency composited over white; every mode
    (L, 1, P, CMYK, YCbCr, 16-bit, ...) converted to 8-bit RGB (16-bit: high byte).
    Size limits are checked from the header before any pixel is decoded.
    """
    return _decode(_as_bytes(data), max_pixels, max_bytes)[3]


def decoded_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Bytes :func:`decode_rgb` works on for ``data``: width x height x channels after mode expansion.

    Read from the header only (nothing is decoded), with the same checks as decode_rgb (BadImage).
    Channels are those of the array the pixels pass through: 4 when an alpha band or a transparency
    key makes decode_rgb composite RGBA over white (a 1-byte palette pixel becomes 4 bytes), 4 for
    4-band modes (CMYK), else 3; times 2 for 16-bit and 4 for 32-bit samples. The decode itself
    peaks at a few times this (conversion temporaries), so callers budget memory with it.
    """
    img = _open(_as_bytes(data), max_pixels, max_bytes)
    with img:
        w, h = img.size
        mode = img.mode
        alpha = "transparency" in img.info or mode in ("RGBA", "LA", "PA", "RGBa", "La")
        bands = 4 if alpha or Image.getmodebands(mode) == 4 else 3
        sample = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1
    return w * h * bands * sample


def pixel_id(rgb: np.ndarray) -> str:
    """Pseudonymous image id: SHA-256 hex of f"{h}x{w}x3:" + the RGB bytes."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"pixel_id expects an HxWx3 uint8 array, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    digest = hashlib.sha256(f"{h}x{w}x3:".encode())
    digest.update(np.ascontiguousarray(rgb).data)  # buffer protocol: no tobytes() copy
    return digest.hexdigest()


def clean_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> CleanImage:
    """Validate and remove all metadata; lossless where the format allows. Raises BadImage.

    JPEG (RGB/L, no EXIF rotation): metadata segments dropped, compressed data kept
    byte for byte. Anything else: the decode_rgb() pixels as a bare PNG. Idempotent.
    """
    data = _as_bytes(data)
    fmt, mode, rotated, rgb = _decode(data, max_pixels, max_bytes)
    h, w = rgb.shape[:2]
    image_id = pixel_id(rgb)
    # Rotated JPEGs can't keep their data: dropping EXIF would drop the rotation too.
    # CMYK/YCCK JPEGs are re-encoded so every stored JPEG decodes the same everywhere.
    if fmt in ("JPEG", "MPO") and mode in ("RGB", "L") and not rotated:
        stripped = _strip_jpeg(data)
        if stripped is not None:
            return CleanImage(stripped, "jpeg", w, h, image_id)
    buf = io.BytesIO()
    # No pnginfo/exif/icc_profile/dpi: the PNG holds IHDR, IDAT and IEND only.
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=6)
    return CleanImage(buf.getvalue(), "png", w, h, image_id)


# ---------------------------------------------------------------------------- audit

# PNG chunks that only affect rendering; any other ancillary chunk is reported.
_PNG_BENIGN = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"bKGD",
               b"pHYs", b"hIST", b"acTL", b"fcTL", b"fdAT"}
_PNG_NAMES = {b"eXIf": "EXIF", b"iCCP": "ICC", b"tIME": "PNG tIME chunk"}


def _exif_names(payload: bytes) -> list[str]:
    names = ["EXIF"]
    try:
        exif = Image.Exif()
        exif.load(payload)
        if exif.get_ifd(0x8825):
            names.append("GPS")
        if 0x927C in exif.get_ifd(0x8769):
            names.append("maker notes")
    except Exception:
        if b"\x88\x25" in payload or b"\x25\x88" in payload:  # GPSInfo tag id, either byte order
            names.append("GPS")
    return names


def _jpeg_metadata(data: bytes) -> list[str]:
    found: list[str] = []
    try:
        for marker, start, end in _jpeg_segments(data):
            body = data[start + 4 : end]
            if marker == _APP0:
                if body[:5] != b"JFIF\x00":
                    found.append("JFXX thumbnail" if body[:5] == b"JFXX\x00" else "APP0")
                elif len(body) >= 14 and (body[12] or body[13]):
                    found.append("JFIF thumbnail")
            elif marker == 0xE1:
                if body[:6] == b"Exif\x00\x00":
                    found += _exif_names(body[6:])
                elif body.startswith(b"http://ns.adobe.com/x"):
                    found.append("XMP")
                else:
                    found.append("APP1")
            elif marker == 0xE2:
                found.append("ICC" if body.startswith(b"ICC_PROFILE") else "MPF" if body[:4] == b"MPF\x00" else "APP2")
            elif marker == 0xED:
                found.append("IPTC" if body.startswith(b"Photoshop 3.0") else "APP13")
            elif marker == _APP14:
                if body[:5] != b"Adobe":
                    found.append("APP14")
            elif 0xE3 <= marker <= 0xEF:
                found.append(f"APP{marker - 0xE0}")
            elif marker == _COM:
                found.append("COM")
            elif marker == _TRAILER:
                found.append(f"trailing data after EOI ({end - start} bytes)")
    except _Malformed:
        pass  # the raw-byte greps below still run
    return found


def _chunks(data: bytes, pos: int, *, png: bool) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload length) of each chunk: PNG (big-endian length first, 4-byte CRC
    after) or RIFF/WebP (type first, little-endian length, payload padded to even)."""
    while pos + 8 <= len(data):
        if png:
            length, ctype = struct.unpack_from(">I4s", data, pos)
        else:
            ctype, length = struct.unpack_from("<4sI", data, pos)
        yield ctype, pos + 8, length
        pos += 8 + length + (4 if png else length & 1)


def _png_metadata(data: bytes) -> list[str]:
    found: list[str] = []
    n = len(data)
    for ctype, start, length in _chunks(data, 8, png=True):
        if ctype in (b"tEXt", b"zTXt", b"iTXt"):
            found.append(f"PNG text chunk {ctype.decode()}")
        elif ctype in _PNG_NAMES:
            found.append(_PNG_NAMES[ctype])
        elif ctype not in _PNG_BENIGN:
            found.append(f"PNG chunk {ctype.decode('latin-1')}")
        if ctype == b"IEND":
            end = start + length + 4  # + CRC
            if end < n:
                found.append(f"trailing data after IEND ({n - end} bytes)")
            break
    return found


def _webp_metadata(data: bytes) -> list[str]:
    found: list[str] = []
    for ctype, start, length in _chunks(data, 12, png=False):
        if ctype == b"EXIF":
            payload = data[start : start + length]
            found += _exif_names(payload[6:] if payload[:6] == b"Exif\x00\x00" else payload)
        elif ctype in (b"XMP ", b"ICCP"):
            found.append("XMP" if ctype == b"XMP " else "ICC")
    return found


def has_metadata(data: bytes) -> list[str]:
    """Names of the metadata found (e.g. 'EXIF', 'GPS', 'XMP', 'ICC', 'COM'); [] = clean."""
    data = _as_bytes(data)
    walker = {"JPEG": _jpeg_metadata, "PNG": _png_metadata, "WEBP": _webp_metadata}.get(sniff_format(data) or "")
    found = walker(data) if walker else []
    # Belt and braces for formats/structures the walkers above don't parse.
    if b"Exif\x00\x00" in data and "EXIF" not in found:
        found.append("EXIF")
    if b"http://ns.adobe.com/xap" in data and "XMP" not in found:
        found.append("XMP")
    return found
