"""GDPR Art. 5(1)(c) minimisation and Art. 25 privacy by design, end to end.

Photos carrying GPS coordinates, maker notes, owner names and comments (JPEG EXIF + COM,
PNG eXIf + tEXt) go through train and predict; no stored artefact (every file under --out:
Parquet tables, CSVs, JSON, HTML, the model) may contain any of it. Outputs shared beyond the
catalog (features, predictions, reports) carry the pseudonymous image_id, not source paths,
unless predict is asked for them with --include-paths (tests/test_erase.py checks that flag).
"""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from artefacts import find
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from PIL.TiffImagePlugin import IFDRational

from canestra.cli import commands as cli
from canestra.privacy import audit
from canestra.progress import Progress
from canestra.vision.images import has_metadata

LAT = ((45, 1), (27, 1), (3647, 100))  # 45° 27' 36.47" N: a home in Milan
LON = ((9, 1), (11, 1), (2411, 100))
GPS_DATUM = "CANESTRA-GPS-DATUM-4711"
MAKER_NOTE = b"CANESTRA-MAKERNOTE-SERIAL-998877"
OWNER = "Giulia Neri"
JPEG_COMMENT = b"Mario Rossi at home, via Roma 1, Milano"
PNG_TEXT = "Luigi Verdi, piazza Duomo 2"


def rationals(values, order: str) -> bytes:
    return b"".join(struct.pack(order + "II", n, d) for n, d in values)


NEEDLES = {
    "EXIF block": b"Exif\x00\x00",
    "GPS latitude": rationals(LAT, ">"),  # Pillow writes EXIF big-endian ("MM")
    "GPS longitude": rationals(LON, ">"),
    "GPS datum": GPS_DATUM.encode(),
    "maker note": MAKER_NOTE,
    "owner": OWNER.encode(),
    "JPEG comment": JPEG_COMMENT,
    "PNG text": PNG_TEXT.encode(),
}


def gps_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x013B] = OWNER  # Artist
    exif[0x8769] = {0x927C: MAKER_NOTE}  # Exif IFD -> MakerNote
    exif[0x8825] = {  # GPS IFD
        1: "N", 2: tuple(IFDRational(n, d) for n, d in LAT),
        3: "E", 4: tuple(IFDRational(n, d) for n, d in LON),
        0x12: GPS_DATUM,  # GPSMapDatum
    }
    return exif


def build_gps_images(root: Path, sample_dir: Path) -> list[Path]:
    """4 photos per class (2 JPEG with EXIF/GPS/maker note/comment, 2 PNG with eXIf/tEXt) + 1 broken file."""
    made = []
    for cls in ("Banana", "Kiwi"):
        (root / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((sample_dir / cls).iterdir())[:4]):
            img = Image.open(src).convert("RGB")
            if i < 2:
                dst = root / cls / src.name
                img.save(dst, "JPEG", quality=92, exif=gps_exif(), comment=JPEG_COMMENT)
            else:
                dst = root / cls / (src.stem + ".png")
                info = PngInfo()
                info.add_text("Comment", PNG_TEXT)
                img.save(dst, "PNG", pnginfo=info, exif=gps_exif())
            made.append(dst)
    (root / "Banana" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return made


@pytest.fixture(scope="module")
def gps_run(spark, sample_dir, tmp_path_factory):
    """Train on the GPS-tagged photos, then `canestra predict` (in-process) into out/pred."""
    from canestra.config import Settings
    from canestra.pipeline.train import train

    base = tmp_path_factory.mktemp("gdpr")
    images, out = base / "Anna Bianchi holiday", base / "out"
    made = build_gps_images(images, sample_dir)
    train(spark, str(images), str(out), Settings.load(pca_k=4, max_iter=10), Progress(quiet=True))
    code = cli.main(["predict", "--model", str(out / "model"), "--images", str(images),
                     "--out", str(out / "pred"), "--quiet"])
    assert code == 0
    return images, out, made


def test_fixture_images_really_carry_the_metadata(gps_run):
    images, _, made = gps_run
    found = find(images, NEEDLES.values())
    assert set(found) == {n.decode("latin-1") for n in NEEDLES.values()}, "every needle is in the sources"
    jpeg, png = made[0], made[2]
    assert {"EXIF", "GPS", "maker notes", "COM"} <= set(has_metadata(jpeg.read_bytes()))
    assert {"EXIF", "PNG text chunk tEXt"} <= set(has_metadata(png.read_bytes()))


def test_no_stored_artefact_holds_image_metadata(gps_run):
    _, out, made = gps_run
    stored = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    for expected in ("metrics.json", "report.html", "quarantine.csv", "pred/predictions.csv",
                     "pred/quarantine.csv", "model/canestra_training_ids.txt"):
        assert expected in stored
    for table in ("catalog", "features", "model/stages", "pred/predictions"):
        assert any(s.startswith(table + "/") and s.endswith(".parquet") for s in stored), table
    leaks = find(out, NEEDLES.values())
    assert leaks == {}, {k: sorted(v) for k, v in leaks.items()}
    content = pq.read_table(out / "catalog", columns=["content"])["content"].to_pylist()
    assert len(content) == len(made)
    assert all(has_metadata(c) == [] for c in content)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_shared_outputs_carry_image_id_not_source_paths(gps_run):
    images, out, made = gps_run
    where = find(out, [str(images), images.name])
    allowed = {"quarantine.csv", "pred/quarantine.csv"}  # operator files listing bad sources
    for name, files in where.items():
        assert all(f.startswith("catalog/") or f in allowed for f in files), (name, sorted(files))
    assert any(f.startswith("catalog/") for f in where[str(images)]), "the catalog keeps source_path"
    assert pq.read_schema(out / "features" / next(p.name for p in (out / "features").glob("*.parquet"))).names \
        == ["image_id", "label", "split", "view", "features", "block"]
    # energy, fruitness, pca_head (16 PCA components) and predicted_at: what `canestra monitor` reads; scores of
    # the answer, not of the person or the photo's origin.
    assert pq.read_table(out / "pred" / "predictions").column_names == \
        ["image_id", "prediction", "probability", "family", "family_probability", "top5", "energy", "fruitness",
         "pca_head", "predicted_at", "label"]
    rows = read_csv(out / "pred" / "predictions.csv")
    assert list(rows[0]) == ["image_id", "prediction", "probability", "family", "family_probability", "top5", "label"] and len(rows) == len(made)
    assert read_csv(out / "pred" / "quarantine.csv")[0]["path"] == str(images / "Banana" / "broken.jpg")
    (rec,) = audit.read_records(str(out / "pred" / "_audit" / "audit.jsonl"))
    assert rec["command"] == "predict" and rec["counts"] == {"predicted": len(made), "quarantined": 1}
    assert rec["details"] == {"include_paths": False}
