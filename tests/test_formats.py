"""Formats recognised by their content, never their name (issue 11): JPEG under any name
(.jfif, .jpe, .JPG, none), PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF (pillow-heif) and AVIF, through
ingest/train, `canestra predict`, the online predictor and the HTTP API. What cannot be decoded
is quarantined with a plain reason, not guessed at.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from canestra.vision.images import BadImage, clean_image, decode_rgb, sniff_format

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
ENV = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
CLASSES = ("Banana", "Kiwi")
JPEG_NAMES = ("{}.jfif", "{}.jpe", "{}.JPG", "{}")  # browsers' .jfif, old .jpe, upper case, no extension
LOSSLESS = {"png": "PNG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}
LOSSY = {"gif": "GIF", "avif": "AVIF", "heic": "HEIF"}
GARBAGE = b"<html><body>404 Not Found</body></html>\n"


def encode(img: Image.Image, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "heic":
        import pillow_heif  # pillow-heif's own writer: Pillow itself has no HEIC encoder

        pillow_heif.from_pillow(img).save(buf, quality=92)
    elif kind == "webp":
        img.save(buf, "WEBP", lossless=True)
    elif kind == "avif":
        img.save(buf, "AVIF", quality=92)
    else:
        img.save(buf, {**LOSSLESS, **LOSSY}[kind])
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory, sample_dir):
    """<root>/<Class>/ holding one sample photo as .jpg, under other JPEG names and in every format.

    Returns (root, {path: (original .jpg path, kind)}, garbage path); kind is "jpeg" for the aliases.
    """
    root = tmp_path_factory.mktemp("formats") / "images"
    files: dict[Path, tuple[Path, str]] = {}
    for cls in CLASSES:
        folder = root / cls
        folder.mkdir(parents=True)
        src = sorted((sample_dir / cls).glob("*.jpg"))[0]
        jpg = Path(shutil.copy(src, folder / "photo.jpg"))
        files[jpg] = (jpg, "jpeg")
        for name in JPEG_NAMES:
            files[Path(shutil.copy(src, folder / name.format("photo-copy")))] = (jpg, "jpeg")
        with Image.open(src) as img:
            img.load()
            for kind in (*LOSSLESS, *LOSSY):
                path = folder / f"photo.{kind}"
                path.write_bytes(encode(img, kind))
                files[path] = (jpg, kind)
            # A PNG with no extension and a HEIC misnamed .jpg: the bytes decide, not the name.
            (folder / "png-no-extension").write_bytes(encode(img, "png"))
            files[folder / "png-no-extension"] = (jpg, "png")
            (folder / "iphone.jpg").write_bytes(encode(img, "heic"))
            files[folder / "iphone.jpg"] = (jpg, "heic")
    garbage = root / CLASSES[0] / "garbage.jpg"
    garbage.write_bytes(GARBAGE)
    return root, files, garbage


def test_formats_are_sniffed_from_magic_bytes(tree):
    _, files, garbage = tree
    for path, (_, kind) in files.items():
        assert sniff_format(path.read_bytes()) == {"jpeg": "JPEG", **LOSSLESS, **LOSSY}[kind], path
    assert sniff_format(garbage.read_bytes()) is None
    with pytest.raises(BadImage, match=r"^not an image \(unrecognised format\)$"):
        decode_rgb(garbage.read_bytes())


def test_every_format_decodes_to_the_same_picture(tree):
    _, files, _ = tree
    for path, (jpg, kind) in files.items():
        want = decode_rgb(jpg.read_bytes()).astype(int)
        got = decode_rgb(path.read_bytes()).astype(int)
        assert got.shape == want.shape, path
        if kind == "jpeg" or kind in LOSSLESS:
            assert np.array_equal(got, want), path  # same pixels: the same image_id
            assert clean_image(path.read_bytes()).image_id == clean_image(jpg.read_bytes()).image_id
        else:
            assert np.abs(got - want).mean() < 6, (path, np.abs(got - want).mean())  # lossy re-encoding only


def test_truncated_heic_and_avif_are_rejected_with_their_format(tree):
    _, files, _ = tree
    for kind in ("heic", "avif"):
        data = next(p for p, (_, k) in files.items() if k == kind).read_bytes()
        with pytest.raises(BadImage, match=rf"^truncated or corrupt {LOSSY[kind]} data"):
            decode_rgb(data[: len(data) // 2])


def test_heif_opener_is_registered_lazily_on_the_first_heic(tree):
    _, files, _ = tree
    heic = next(p for p, (_, k) in files.items() if k == "heic")
    code = ("import sys\nfrom PIL import Image\nfrom canestra.vision.images import decode_rgb\n"
            "decode_rgb(open(sys.argv[1], 'rb').read()); before = 'HEIF' in Image.OPEN\n"
            "decode_rgb(open(sys.argv[2], 'rb').read()); print(before, 'HEIF' in Image.OPEN)\n")
    jpg = files[heic][0]
    proc = subprocess.run([sys.executable, "-c", code, str(jpg), str(heic)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]  # a JPEG-only job never loads pillow-heif


def test_online_predictor_and_http_api_answer_every_format(tree):
    from fastapi.testclient import TestClient

    from canestra.config import Settings
    from canestra.serve.app import create_app
    from canestra.serve.predictor import OnlinePredictor

    _, files, garbage = tree
    predictor = OnlinePredictor.from_model_dir(str(FIXTURE_MODEL), threads=1)
    with TestClient(create_app(predictor=predictor, settings=Settings.load(serve_threads=1))) as client:
        for path, (jpg, kind) in files.items():
            want = predictor.predict_bytes(jpg.read_bytes())
            got = predictor.predict_bytes(path.read_bytes())
            assert got.label == want.label, (path, got, want)
            r = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
            assert r.status_code == 200, (path, r.text)
            assert r.json()["prediction"] == want.label, (path, r.json())
            if kind == "jpeg" or kind in LOSSLESS:
                assert got.image_id == want.image_id and got.probability == pytest.approx(want.probability, abs=1e-6)
        r = client.post("/v1/predict", content=garbage.read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 415 and "not an image" in r.json()["detail"]


def test_ingest_catalogs_every_format(spark, tree, tmp_path):
    from canestra.pipeline.ingest import ingest

    root, files, garbage = tree
    res = ingest(spark, str(root), str(tmp_path / "out"), reuse=False)
    rows = spark.read.parquet(res.catalog_path).select("source_path", "label", "format").collect()
    assert {r.source_path for r in rows} == {str(p) for p in files}  # training sees every format
    stored = {r.source_path: r.format for r in rows}
    for path, (_, kind) in files.items():
        assert stored[str(path)] == ("jpeg" if kind == "jpeg" else "png"), path  # JPEGs stripped losslessly
    with open(res.quarantine_csv, newline="") as fh:
        assert [(r["path"], r["reason"]) for r in csv.DictReader(fh)] == [(str(garbage),
                                                                          "not an image (unrecognised format)")]


@pytest.mark.slow
def test_cli_predict_reads_every_format_by_content(tree, tmp_path):
    root, files, garbage = tree
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "canestra.cli", "predict", "--model", str(FIXTURE_MODEL), "--images",
                           str(root), "--out", str(out), "--include-paths", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr
    with open(out / "predictions.csv", newline="") as fh:
        rows = {Path(r["path"]): r for r in csv.DictReader(fh)}
    assert set(rows) == set(files)
    for path, (jpg, kind) in files.items():
        assert rows[path]["prediction"] == rows[jpg]["prediction"], path
        if kind == "jpeg" or kind in LOSSLESS:  # same pixels: the very same answer
            assert (rows[path]["image_id"], rows[path]["probability"]) == (rows[jpg]["image_id"],
                                                                           rows[jpg]["probability"]), path
    with open(out / "quarantine.csv", newline="") as fh:
        assert [(r["path"], r["reason"]) for r in csv.DictReader(fh)] == [(str(garbage),
                                                                          "not an image (unrecognised format)")]
