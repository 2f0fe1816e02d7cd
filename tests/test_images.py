"""Decoding, validation and metadata stripping of single images."""

from __future__ import annotations

import time

import numpy as np
import pytest
from corpus import build_bad_corpus, decompression_bomb_png, make_valid_jpeg

from canestra.images import BadImage, clean_image, decode_rgb, has_metadata, pixel_id


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_dir):
    return build_bad_corpus(tmp_path_factory.mktemp("corpus"), sample_dir / "Banana")


def test_every_valid_file_decodes_to_rgb(corpus):
    for p in corpus["valid"]:
        rgb = decode_rgb(p.read_bytes())
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, p


def test_every_bad_file_is_rejected_with_its_reason(corpus):
    for p in corpus["bad"]:
        try:
            data = p.read_bytes()
        except OSError:
            continue  # unreadable: the reader's case (see test_pipeline_bad_inputs)
        if p.suffix == ".txt":
            continue  # rejected by extension before decoding
        with pytest.raises(BadImage) as err:
            clean_image(data)
        assert corpus["expected_reason"][p] in err.value.reason, (p, err.value.reason)


def test_exif_rotation_applied(corpus):
    rotated = next(p for p in corpus["valid"] if p.name == "rotated.jpg")
    assert decode_rgb(rotated.read_bytes()).shape == (120, 80, 3)  # stored 120x80 (WxH), shown 80x120
    cleaned = clean_image(rotated.read_bytes())
    assert (cleaned.width, cleaned.height) == (80, 120)
    assert decode_rgb(cleaned.content).shape == (120, 80, 3)


def test_alpha_over_white_and_16_bit_scaling(corpus):
    alpha = next(p for p in corpus["valid"] if p.name == "alpha.png")
    assert tuple(decode_rgb(alpha.read_bytes())[0, 0]) == (255, 255, 255)
    sixteen = next(p for p in corpus["valid"] if p.name == "sixteen_bit.png")
    rgb = decode_rgb(sixteen.read_bytes())
    assert rgb[0, 0].tolist() == [255, 255, 255]  # 65535 -> 255
    assert rgb[50, 50].tolist() == [30, 30, 30]  # 30*257 -> 30


def test_bomb_rejected_fast_without_decoding():
    data = decompression_bomb_png()
    t = time.perf_counter()
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_rgb(data)
    assert time.perf_counter() - t < 1.0


def test_gps_and_all_metadata_removed(corpus):
    tagged = next(p for p in corpus["valid"] if p.name == "gps_tagged.jpg")
    found = has_metadata(tagged.read_bytes())
    assert {"EXIF", "GPS", "XMP", "COM"} <= set(found)
    for p in corpus["valid"]:
        cleaned = clean_image(p.read_bytes())
        assert has_metadata(cleaned.content) == [], p
        assert b"Mario Rossi" not in cleaned.content and b"PhoneMaker" not in cleaned.content


def test_jpeg_strip_is_lossless_and_idempotent(corpus, sample_dir):
    files = [p for p in corpus["valid"] if p.name in ("gps_tagged.jpg", "gray.jpg")]
    files += sorted((sample_dir / "Banana").glob("*.jpg"))[:10]
    for p in files:
        data = p.read_bytes()
        cleaned = clean_image(data)
        assert cleaned.format == "jpeg"
        assert np.array_equal(decode_rgb(data), decode_rgb(cleaned.content))
        again = clean_image(cleaned.content)
        assert again.content == cleaned.content and again.image_id == cleaned.image_id


def test_non_jpeg_becomes_lossless_png(corpus):
    for name in ("alpha.png", "cmyk.jpg", "rotated.jpg", "sixteen_bit.png", "palette_trns.png"):
        p = next(x for x in corpus["valid"] if x.name == name)
        cleaned = clean_image(p.read_bytes())
        assert cleaned.format == "png"
        assert np.array_equal(decode_rgb(cleaned.content), decode_rgb(p.read_bytes()))
        assert clean_image(cleaned.content).image_id == cleaned.image_id


def test_pixel_id_is_content_hash(tmp_path):
    a = make_valid_jpeg(tmp_path / "a.jpg", color=(1, 2, 3))
    b = make_valid_jpeg(tmp_path / "b.jpg", color=(200, 2, 3))
    ida, idb = clean_image(a.read_bytes()).image_id, clean_image(b.read_bytes()).image_id
    assert ida != idb and len(ida) == 64
    assert ida == pixel_id(decode_rgb(a.read_bytes()))
