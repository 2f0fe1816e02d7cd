"""Decoding, validation and metadata stripping of single images (canestra.vision.images)."""

from __future__ import annotations

import hashlib
import io
import struct
import sys
import time
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/corpus.py (tests/ is not a package)

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from canestra.vision.images import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    BadImage,
    CleanImage,
    clean_image,
    decode_rgb,
    has_metadata,
    pixel_id,
)

HERE = Path(__file__).resolve().parent
BUNDLED_BANANA = HERE.parent / "sample" / "fruits-360" / "Banana"
SHARED_BANANA = HERE.parent.parent / "shared" / "data" / "fruits-360-sample" / "Training" / "Banana"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    source = BUNDLED_BANANA if BUNDLED_BANANA.is_dir() else None
    return corpus.build_bad_corpus(tmp_path_factory.mktemp("corpus"), source)


def by_name(built, name: str) -> Path:
    return next(p for p in built["valid"] if p.name == name)


def jpeg_bytes(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def entropy_data(jpeg: bytes) -> bytes:
    """Everything from the first SOS to the first EOI: the compressed pixels."""
    return jpeg[jpeg.index(b"\xff\xda") : jpeg.index(b"\xff\xd9", jpeg.index(b"\xff\xda")) + 2]


# ----------------------------------------------------------------------------- corpus


def test_corpus_covers_the_awkward_cases(built):
    names = {p.name for p in built["valid"]}
    assert {"alpha.png", "gray.jpg", "cmyk.jpg", "sixteen_bit.png", "rotated.jpg", "gps_tagged.jpg",
            "pomme rôtie 🍎 01.jpg", "palette_trns.png", "phone mpo.jpg"} <= names
    assert any("🍎" in p.parent.name and " " in p.parent.name for p in built["valid"])
    assert set(built["expected_reason"]) == set(built["bad"])
    assert any(p.is_symlink() and not p.exists() for p in built["bad"])
    modes = {p.name: Image.open(p).mode for p in built["valid"]}
    assert modes["sixteen_bit.png"] == "I;16" and modes["cmyk.jpg"] == "CMYK" and modes["gray.jpg"] == "L"


def test_bomb_fixture_is_cheap_and_a_valid_png():
    tracemalloc.start()
    t = time.perf_counter()
    data = corpus.decompression_bomb_png()
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 2.0 and peak < 50e6 and len(data) < 1_000_000
    assert struct.unpack(">II", data[16:24]) == (30000, 30000)
    small = Image.open(io.BytesIO(corpus.decompression_bomb_png(300, 700)))  # same recipe, decodable size
    small.load()
    assert small.size == (300, 700) and not np.asarray(small).any()


# ----------------------------------------------------------------------------- decode_rgb


def test_every_valid_file_decodes_to_contiguous_rgb(built):
    for p in built["valid"]:
        rgb = decode_rgb(p.read_bytes())
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, p
        assert rgb.flags.c_contiguous and rgb.flags.writeable, p


def test_every_bad_file_is_rejected_with_its_reason(built):
    checked = 0
    for p in built["bad"]:
        try:
            data = p.read_bytes()
        except OSError:
            continue  # dangling symlink / chmod 000: the reader's case (see test_pipeline)
        for fn in (decode_rgb, clean_image):
            with pytest.raises(BadImage) as err:
                fn(data)
            assert built["expected_reason"][p] in err.value.reason, (p, err.value.reason)
            assert str(err.value) == err.value.reason and isinstance(err.value, ValueError)
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(orientation):
    rgb = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = png_bytes(Image.fromarray(rgb), exif=exif)  # PNG: exact pixels, so the comparison is exact
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = decode_rgb(data)
    assert np.array_equal(got, expected) and got.flags.c_contiguous
    assert got.shape == ((10, 6, 3) if orientation >= 5 else (6, 10, 3))


def test_exif_rotated_jpeg(built):
    data = by_name(built, "rotated.jpg").read_bytes()
    assert Image.open(io.BytesIO(data)).size == (120, 80)  # stored landscape
    assert decode_rgb(data).shape == (120, 80, 3)  # displayed portrait (orientation 6)
    cleaned = clean_image(data)
    assert (cleaned.width, cleaned.height, cleaned.format) == (80, 120, "png")
    assert np.array_equal(decode_rgb(cleaned.content), decode_rgb(data))  # rotation baked in


def test_alpha_and_transparency_composited_over_white(built):
    rgb = decode_rgb(by_name(built, "alpha.png").read_bytes())
    assert rgb[0, 0].tolist() == [255, 255, 255]  # transparent black corner -> white
    assert rgb[50, 50].tolist() == [240, 200, 30]  # opaque fruit untouched
    half = np.zeros((1, 1, 4), np.uint8)
    half[..., 3] = 128  # 50% black over white
    assert decode_rgb(png_bytes(Image.fromarray(half, "RGBA")))[0, 0].tolist() == [127, 127, 127]
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], np.uint8), "LA")
    assert decode_rgb(png_bytes(la)).tolist() == [[[255] * 3, [10] * 3]]

    p = by_name(built, "palette_trns.png")
    indices = np.asarray(Image.open(p))
    rgb = decode_rgb(p.read_bytes())
    assert (indices == 0).any() and (indices != 0).any()
    assert (rgb[indices == 0] == 255).all()  # tRNS index 0 -> white
    palette = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(rgb[indices != 0], palette[indices != 0])


def test_sixteen_bit_scaled_by_high_byte_not_clipped():
    exact = np.array([[0, 255, 256, 32768, 65535, 30 * 257]], np.uint16)
    got = decode_rgb(png_bytes(Image.fromarray(exact)))  # mode I;16
    assert got[..., 0].tolist() == [[0, 0, 1, 128, 255, 30]]
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    buf = io.BytesIO()
    Image.fromarray(exact.astype(np.int32)).save(buf, "TIFF")  # mode I (32-bit), same 16-bit scale
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
    assert decode_rgb(buf.getvalue())[..., 0].tolist() == [[0, 0, 1, 128, 255, 30]]


def test_sixteen_bit_corpus_values(built):
    rgb = decode_rgb(by_name(built, "sixteen_bit.png").read_bytes())
    fruit = corpus.fruit_rgb()[..., 1]  # stored as value * 257
    assert rgb[0, 1].tolist() == [128] * 3 and rgb[0, 2].tolist() == [1] * 3  # 32768, 256
    assert rgb[50, 50].tolist() == [fruit[50, 50]] * 3 == [30] * 3
    assert rgb[99, 99].tolist() == [255] * 3  # 65535


def test_grayscale_and_cmyk_convert(built):
    gray = decode_rgb(by_name(built, "gray.jpg").read_bytes())
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert abs(int(gray[50, 50, 0]) - 200) <= 3 and gray[0, 0, 0] >= 250
    cmyk = decode_rgb(by_name(built, "cmyk.jpg").read_bytes()).astype(int)
    assert np.abs(cmyk[50, 50] - [200, 30, 30]).max() <= 12  # red fruit stays red
    assert cmyk[0, 0].min() >= 245  # white background stays white


def test_bomb_rejected_fast_without_decoding():
    data = corpus.decompression_bomb_png()
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(BadImage, match=r"decompression bomb: 30000x30000 pixels exceeds the 40000000-pixel limit"):
        decode_rgb(data)
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 10e6  # 900 Mpx never allocated


def test_pixel_limit_is_per_call_and_pillow_global_untouched():
    data = png_bytes(Image.fromarray(corpus.fruit_rgb()))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match=r"100x100 pixels exceeds the 5000-pixel limit"):
        decode_rgb(data, max_pixels=5000)
    assert decode_rgb(data, max_pixels=10_000).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == before and DEFAULT_MAX_PIXELS == 40_000_000
    # Above Pillow's own warning threshold: a BadImage, never a DecompressionBombWarning.
    big = corpus.decompression_bomb_png(10000, 10000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadImage, match="decompression bomb"):
            decode_rgb(big, max_pixels=10**9)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_size_limits_and_input_types():
    data = jpeg_bytes(corpus.fruit_rgb())
    with pytest.raises(BadImage, match=r"file too large: \d+ bytes exceeds the 100-byte limit"):
        decode_rgb(data, max_bytes=100)
    with pytest.raises(BadImage, match=r"empty file \(0 bytes\)"):
        clean_image(b"")
    ref = decode_rgb(data)
    assert np.array_equal(decode_rgb(bytearray(data)), ref) and np.array_equal(decode_rgb(memoryview(data)), ref)
    assert clean_image(bytearray(data)) == clean_image(data)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "truncated or corrupt HEIF"),  # HEIC read since issue 11
        (b"8BPS\x00\x01" + b"\x00" * 64, "unsupported image format PSD"),
        (b"<html><body>404</body></html>", "not an image (unrecognised format)"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 10, "truncated or corrupt JPEG"),
        (b"\x89PNG\r\n\x1a\n", "truncated or corrupt PNG"),
    ],
)
def test_reasons_are_plain_english(data, reason):
    with pytest.raises(BadImage) as err:
        decode_rgb(data)
    assert reason in err.value.reason


def test_mutated_and_truncated_files_only_ever_raise_badimage():
    """Fuzz: flipping bytes or cutting files may decode to garbage, but never raise anything else."""
    rng = np.random.default_rng(42)
    sources = [jpeg_bytes(corpus.fruit_rgb()), jpeg_bytes(corpus.fruit_rgb(), progressive=True),
               png_bytes(Image.fromarray(corpus.fruit_rgb())), png_bytes(Image.fromarray(corpus.fruit_rgb()[..., 0]))]
    outcomes = {"ok": 0, "bad": 0}
    for src in sources:
        for _ in range(150):
            data = bytearray(src)
            if rng.random() < 0.3:
                data = data[: int(rng.integers(1, len(data)))]
            else:
                for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
                    data[pos] = int(rng.integers(0, 256))
            try:
                rgb = decode_rgb(bytes(data))
                assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
                cleaned = clean_image(bytes(data))
                assert has_metadata(cleaned.content) == []
                outcomes["ok"] += 1
            except BadImage:
                outcomes["bad"] += 1
    assert outcomes["ok"] > 0 and outcomes["bad"] > 0


def test_thread_safe(built):
    datas = [p.read_bytes() for p in built["valid"]] * 4
    serial = [clean_image(d) for d in datas]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(clean_image, datas))
    assert parallel == serial


# ----------------------------------------------------------------------------- clean_image / has_metadata


def test_has_metadata_finds_the_leaks(built):
    found = has_metadata(by_name(built, "gps_tagged.jpg").read_bytes())
    assert {"EXIF", "GPS", "XMP", "COM", "IPTC", "ICC"} <= set(found), found
    mpo = has_metadata(by_name(built, "phone mpo.jpg").read_bytes())
    assert {"EXIF", "GPS", "MPF"} <= set(mpo) and any(n.startswith("trailing data after EOI") for n in mpo)
    png = has_metadata(by_name(built, "texty.png").read_bytes())
    assert {"PNG text chunk tEXt", "PNG text chunk iTXt", "EXIF"} <= set(png), png
    assert {"EXIF", "GPS"} <= set(has_metadata(by_name(built, "lossless.webp").read_bytes()))
    assert has_metadata(by_name(built, "pomme rôtie 🍎 01.jpg").read_bytes()) == []
    # The raw-byte greps catch what a structure walker would miss.
    assert "EXIF" in has_metadata(b"GIF89a junk Exif\x00\x00 junk")
    assert "XMP" in has_metadata(b"BM junk http://ns.adobe.com/xap/1.0/ junk")


def test_clean_removes_all_metadata_from_every_valid_file(built):
    for p in built["valid"]:
        data = p.read_bytes()
        cleaned = clean_image(data)
        assert isinstance(cleaned, CleanImage)
        assert has_metadata(cleaned.content) == [], (p, has_metadata(cleaned.content))
        for secret in (corpus.PERSONAL_TEXT, b"PhoneMaker", b"45.46N", b"GPSLatitude", b"ICC_PROFILE", b"MPF\x00"):
            assert secret not in cleaned.content, (p, secret)
        assert cleaned.format in ("jpeg", "png")
        assert Image.open(io.BytesIO(cleaned.content)).format == cleaned.format.upper()
        if cleaned.format == "png":  # nothing but the critical chunks
            chunks, pos = [], 8
            while pos < len(cleaned.content):
                length, ctype = struct.unpack_from(">I4s", cleaned.content, pos)
                chunks.append(ctype)
                pos += 12 + length
            assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}, (p, chunks)


def test_image_id_is_the_pixel_id_of_both_original_and_clean(built):
    for p in built["valid"]:
        data = p.read_bytes()
        cleaned = clean_image(data)
        assert cleaned.image_id == pixel_id(decode_rgb(data)) == pixel_id(decode_rgb(cleaned.content)), p
        h, w = decode_rgb(data).shape[:2]
        assert (cleaned.width, cleaned.height) == (w, h), p


def test_clean_is_idempotent(built):
    for p in built["valid"]:
        once = clean_image(p.read_bytes())
        twice = clean_image(once.content)
        assert twice == once, p  # same bytes, format, size and id


def test_jpeg_fast_path_is_lossless_and_keeps_compressed_data(built):
    names = ("gps_tagged.jpg", "gray.jpg", "progressive exif.jpg", "phone mpo.jpg", "pomme rôtie 🍎 01.jpg")
    for name in names:
        data = by_name(built, name).read_bytes()
        cleaned = clean_image(data)
        assert cleaned.format == "jpeg", name
        assert np.array_equal(decode_rgb(data), decode_rgb(cleaned.content)), name  # bit-exact
        assert entropy_data(cleaned.content) == entropy_data(data), name  # not re-encoded
        assert len(cleaned.content) <= len(data)
    gray = clean_image(by_name(built, "gray.jpg").read_bytes())
    assert Image.open(io.BytesIO(gray.content)).mode == "L"  # stays single-channel
    mpo = clean_image(by_name(built, "phone mpo.jpg").read_bytes())
    assert Image.open(io.BytesIO(mpo.content)).format == "JPEG"  # second frame dropped


def test_jfif_thumbnail_dropped_adobe_kept():
    rgb = corpus.fruit_rgb()
    plain = jpeg_bytes(rgb)
    assert plain[2:4] == b"\xff\xe0" and plain[6:11] == b"JFIF\x00"
    body = plain[6 : 6 + 14 - 2] + b"\x02\x02" + bytes(range(12))  # 2x2 RGB thumbnail
    with_thumb = plain[:4] + struct.pack(">H", len(body) + 2) + body + plain[4 + struct.unpack(">H", plain[4:6])[0]:]
    assert "JFIF thumbnail" in has_metadata(with_thumb)
    cleaned = clean_image(with_thumb)
    assert cleaned.format == "jpeg" and has_metadata(cleaned.content) == []
    assert np.array_equal(decode_rgb(cleaned.content), decode_rgb(plain))
    adobe = plain[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01" + plain[2:]
    out = clean_image(adobe).content
    assert b"\xff\xee\x00\x0eAdobe" in out and np.array_equal(decode_rgb(out), decode_rgb(adobe))


def test_non_jpeg_becomes_lossless_png(built):
    for name in ("alpha.png", "cmyk.jpg", "rotated.jpg", "sixteen_bit.png", "palette_trns.png", "texty.png",
                 "lossless.webp", "plain.bmp", "plain.tiff"):
        data = by_name(built, name).read_bytes()
        cleaned = clean_image(data)
        assert cleaned.format == "png", name
        assert np.array_equal(decode_rgb(cleaned.content), decode_rgb(data)), name
    assert np.array_equal(decode_rgb(by_name(built, "plain.bmp").read_bytes()), corpus.fruit_rgb((220, 190, 20)))


def test_pixel_id_is_a_stable_content_hash(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    expected = hashlib.sha256(b"2x3x3:" + bytes(range(18))).hexdigest()
    assert pixel_id(rgb) == expected == pixel_id(rgb.copy())
    assert pixel_id(rgb.reshape(3, 2, 3)) != expected  # same bytes, other shape
    assert pixel_id(np.asfortranarray(rgb)) == expected  # layout does not matter
    with pytest.raises(ValueError):
        pixel_id(rgb.astype(np.float32))
    a = corpus.make_valid_jpeg(tmp_path / "a.jpg", color=(1, 2, 3))
    b = corpus.make_valid_jpeg(tmp_path / "b.jpg", color=(200, 2, 3))
    ida, idb = clean_image(a.read_bytes()).image_id, clean_image(b.read_bytes()).image_id
    assert ida != idb and len(ida) == 64
    assert ida == pixel_id(decode_rgb(a.read_bytes())) == clean_image(a.read_bytes()).image_id
    c = corpus.make_valid_jpeg(tmp_path / "c.jpg", color=(1, 2, 3), exif=corpus.gps_exif().tobytes(),
                               comment=b"Mario Rossi")
    assert clean_image(c.read_bytes()).image_id == ida  # metadata is not part of the identity


@pytest.mark.parametrize("folder", [SHARED_BANANA, BUNDLED_BANANA], ids=["shared", "bundled"])
def test_real_fruits360_jpegs_clean_losslessly(folder):
    files = sorted(folder.glob("*.jpg"))
    if not files:
        pytest.skip(f"{folder} not available")
    for p in files:
        data = p.read_bytes()
        cleaned = clean_image(data)
        assert cleaned.format == "jpeg" and (cleaned.width, cleaned.height) == (100, 100), p
        assert np.array_equal(decode_rgb(cleaned.content), decode_rgb(data)), p
        assert entropy_data(cleaned.content) == entropy_data(data), p
        assert has_metadata(cleaned.content) == [] and clean_image(cleaned.content) == cleaned, p
