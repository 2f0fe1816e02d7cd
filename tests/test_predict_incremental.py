"""`canestra predict --incremental`: only images not yet in OUT's predictions are scored and added
to the predictions table and predictions.csv; a re-run adds nothing; the same pixels under a new
name are not predicted twice; plain `predict` still rewrites everything."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from cnn_probe import cnn_rows  # noqa: F401  (fixture)

from canestra.cli import commands as cli


def table(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "predictions").to_pylist(), key=lambda r: r["image_id"])


def csv_rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def predict(model: str, images: Path, out: Path, *extra: str) -> int:
    return cli.main(["predict", "--model", model, "--images", str(images), "--out", str(out), "--quiet", *extra])


def test_incremental_predict_is_idempotent_and_appends(spark, trained, sample_dir, tmp_path, monkeypatch, cnn_rows,
                                                        capsys):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)
    model = str(Path(trained.out_dir) / "model")
    images, out = tmp_path / "images", tmp_path / "out"
    (images / "Kiwi").mkdir(parents=True)
    kiwis = sorted((sample_dir / "Kiwi").glob("*.jpg"))
    for src in kiwis[:4]:
        shutil.copy(src, images / "Kiwi" / src.name)

    assert predict(model, images, out, "--incremental") == 0
    first = table(out)
    assert len(first) == 4 and cnn_rows == [4]
    assert "4 predictions (4 new)" in capsys.readouterr().out

    # Idempotent: nothing new, nothing scored, nothing added, the same answers.
    before_csv = (out / "predictions.csv").read_text()
    assert predict(model, images, out, "--incremental") == 0
    assert cnn_rows == [4] and table(out) == first
    assert (out / "predictions.csv").read_text() == before_csv
    assert "4 predictions (0 new)" in capsys.readouterr().out

    # Two new photos and one old photo under a new name: only the two are scored and appended.
    def data_files() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (out / "predictions").glob("*.parquet")}

    old_files = data_files()
    for src in kiwis[4:6]:
        shutil.copy(src, images / "Kiwi" / src.name)
    shutil.copy(kiwis[0], images / "Kiwi" / "same-pixels.jpg")
    assert predict(model, images, out, "--incremental") == 0
    assert cnn_rows == [4, 2]
    after = table(out)
    ids = [r["image_id"] for r in after]
    assert len(after) == 6 and len(set(ids)) == 6
    new_files = data_files()  # appended as new files: the first run's files are untouched
    assert {k: new_files.get(k) for k in old_files} == old_files and len(new_files) > len(old_files)
    assert [r for r in after if r["image_id"] in {f["image_id"] for f in first}] == first
    rows = csv_rows(out)
    assert sorted(r["image_id"] for r in rows) == ids and all(r["label"] == "Kiwi" for r in rows)

    # Paths cannot be mixed into a table written without them.
    assert predict(model, images, out, "--incremental", "--include-paths") == 2
    assert "--include-paths" in capsys.readouterr().err
    assert table(out) == after

    # Without --incremental, predict rewrites: one row per file (embeddings come from the store).
    assert predict(model, images, out) == 0
    assert cnn_rows == [4, 2] and len(table(out)) == 7 and len(csv_rows(out)) == 7


def test_score_images_is_usable_without_a_store(spark, trained, sample_dir):
    """The scoring function the streaming `watch` shares: a DataFrame of images -> prediction rows."""
    from canestra.pipeline.predict import MONITOR_COLUMNS, PREDICTION_COLUMNS, load_model, score_images
    from canestra.vision.images import clean_image

    files = sorted((sample_dir / "Banana").glob("*.jpg"))[:3]
    imgs = [clean_image(f.read_bytes()) for f in files]
    df = spark.createDataFrame([(i.image_id, i.content) for i in imgs], "image_id string, content binary")
    rows, update = score_images(load_model(str(Path(trained.out_dir) / "model")), df)
    got = rows.collect()
    assert update is None and rows.columns == PREDICTION_COLUMNS + MONITOR_COLUMNS
    assert sorted(r.image_id for r in got) == sorted(i.image_id for i in imgs)
    assert all(r.prediction == "Banana" and 0 < r.probability <= 1 for r in got)
